"""One hand-written Triton kernel for the CUDA decode step: attention of one new token, start to end.

At batch 1 on a GPU a decode step is bound by kernel count, not bytes: torch.compile turns the lines of
`Attention.forward` between the q/k/v product and o_proj into five kernels (q/k norm statistics, norm and
rotation, two cache writes, cuDNN attention), each costing a microsecond or more of fixed time for a few
kilobytes of work. This kernel does the same math in one launch, one program per (row, key/value head):
RMSNorm the key head and its query heads, rotate them, write the new key and value to the cache, and attend
over the row's cached slots before the new one plus the new one (online softmax), adding the row's
attention mask as SDPA would.

`decode_attention` is a torch custom op (mutating the two cache buffers), so torch.compile and CUDA graphs
treat it as one opaque kernel. The model calls it only on CUDA; the tests run the same kernel on CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1) and compare it with the model's PyTorch lines.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model keeps its PyTorch path
    triton = None


def available(device: torch.device) -> bool:
    """Whether the fused decode attention can run on this device."""
    return triton is not None and device.type == "cuda"


def dependent_launch(device: torch.device) -> dict[str, bool]:
    """Launch options for programmatic dependent launch (Hopper and later), as inductor's kernels get them: a
    kernel starts while the one before it finishes, and waits (gdc_wait) only where it reads that one's output."""
    on = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if triton is not None:

    @triton.jit
    def _matvec_step(acc, squares, weights, x_ptr, norm_ptr, k, K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr):
        """acc += weights [rows, BLOCK_K] x input[k], the input made from x as the flags say; squares: x^2 for NORM."""
        ok = k < K
        x = tl.load(x_ptr + k, mask=ok, other=0.0).to(tl.float32)
        if SWIGLU:  # x holds gate then up (K each): the input is silu(gate) * up
            x = x * tl.sigmoid(x) * tl.load(x_ptr + K + k, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            squares += x * x
            x = x * tl.load(norm_ptr + k, mask=ok, other=0.0).to(tl.float32)
        return acc + weights.to(tl.float32) * x[None, :], squares

    @triton.jit
    def _matvec_kernel(
        x_ptr, weight_ptr, scale_ptr, bias_ptr, norm_ptr, residual_ptr, out_ptr, N, eps,
        K: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr, BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out[rows] = residual + weight[rows] @ input * scale + bias, where input is x, RMSNorm(x) or SwiGLU(x).

        The norm's statistics are summed alongside the product and applied to its sum (rms is one number per row
        of x), so the norm needs no kernel of its own. The first weights are loaded before waiting for the kernel
        that produces x: they never change, and their latency then overlaps that kernel's end."""
        dtype = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        cols = tl.arange(0, BLOCK_K)
        tile = weight_ptr + rows[:, None] * K + cols[None, :]
        weights = tl.load(tile, mask=live[:, None] & (cols < K)[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        squares = tl.zeros([BLOCK_K], tl.float32)
        acc, squares = _matvec_step(acc, squares, weights, x_ptr, norm_ptr, cols, K, NORM, SWIGLU)
        for start in tl.range(BLOCK_K, K, BLOCK_K):
            weights = tl.load(tile + start, mask=live[:, None] & (start + cols < K)[None, :], other=0.0)
            acc, squares = _matvec_step(acc, squares, weights, x_ptr, norm_ptr, start + cols, K, NORM, SWIGLU)
        out = tl.sum(acc, axis=1)
        if NORM:
            out = out * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if SCALE:
            out = out * tl.load(scale_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if BIAS:
            out += tl.load(bias_ptr + rows, mask=live, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        if RESIDUAL:  # rounded first, as residual + linear(x) rounds the product before adding
            out = out.to(dtype).to(tl.float32) + tl.load(residual_ptr + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(dtype), mask=live)

    # (rows, columns per step, warps) tried once per matrix shape on the GPU; triton.autotune times them with the
    # L2 cache flushed, as the model reads each weight from memory.
    MATVEC_SETTINGS = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (2, 512, 2), (4, 256, 2), (16, 256, 4)]
    _matvec_tuned = triton.autotune(
        [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in MATVEC_SETTINGS],
        key=["N", "K", "NORM", "SWIGLU"],
    )(_matvec_kernel)

    @triton.jit
    def _norm_rotate(first, second, weight_ptr, cos, sin, eps, dtype: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
        """RMSNorm (statistics in float32, cast, times the weight) then rotation of heads given as two halves
        [rows, HALF] in float32; returns the rotated halves rounded to the activations' dtype."""
        if QK_NORM:
            offsets = tl.arange(0, HALF)
            mean_square = (tl.sum(first * first, axis=1) + tl.sum(second * second, axis=1)) / (2 * HALF)
            scale = tl.rsqrt(mean_square + eps)
            w_first = tl.load(weight_ptr + offsets).to(tl.float32)[None, :]
            w_second = tl.load(weight_ptr + HALF + offsets).to(tl.float32)[None, :]
            first = ((first * scale[:, None]).to(dtype).to(tl.float32) * w_first).to(dtype).to(tl.float32)
            second = ((second * scale[:, None]).to(dtype).to(tl.float32) * w_second).to(dtype).to(tl.float32)
        rotated_first = (first * cos - second * sin).to(dtype).to(tl.float32)
        rotated_second = (second * cos + first * sin).to(dtype).to(tl.float32)
        return rotated_first, rotated_second

    @triton.jit
    def _decode_attention_kernel(
        qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slot_ptr, mask_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
        qkv_row_stride, rope_row_stride, mask_row_stride, cache_row_stride, cache_head_stride, cache_slot_stride, out_row_stride,
        eps, scale,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HALF: tl.constexpr,
        BLOCK: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # launched while the q/k/v product finishes; its output is read from here on
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        dtype = k_cache_ptr.dtype.element_ty
        dim = 2 * HALF
        slot = tl.load(slot_ptr)
        half = tl.arange(0, HALF)
        full = tl.arange(0, 2 * HALF)
        cos = tl.load(cos_ptr + row * rope_row_stride + half).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + row * rope_row_stride + half).to(tl.float32)[None, :]
        qkv = qkv_ptr + row * qkv_row_stride

        # The new key and value: normed, rotated, written to the cache slot.
        key = qkv + (HEADS + kv_head) * dim
        k_first, k_second = _norm_rotate(
            tl.load(key + half).to(tl.float32)[None, :], tl.load(key + HALF + half).to(tl.float32)[None, :],
            k_weight_ptr, cos, sin, eps, dtype, HALF, QK_NORM,
        )  # fmt: skip
        value = tl.load(qkv + (HEADS + tl.num_programs(1) + kv_head) * dim + full)
        cache_head = row * cache_row_stride + kv_head * cache_head_stride
        k_slot = k_cache_ptr + cache_head + slot * cache_slot_stride
        tl.store(k_slot + half[None, :], k_first.to(dtype))
        tl.store(k_slot + HALF + half[None, :], k_second.to(dtype))
        tl.store(v_cache_ptr + cache_head + slot * cache_slot_stride + full, value)

        # The query heads that share this key/value head, as rows [GROUP_P2, ...] (rows past GROUP masked).
        members = tl.arange(0, GROUP_P2)
        real = members < GROUP
        query = qkv + (kv_head * GROUP + members)[:, None] * dim
        q_first, q_second = _norm_rotate(
            tl.load(query + half[None, :], mask=real[:, None], other=0.0).to(tl.float32),
            tl.load(query + HALF + half[None, :], mask=real[:, None], other=0.0).to(tl.float32),
            q_weight_ptr, cos, sin, eps, dtype, HALF, QK_NORM,
        )  # fmt: skip

        # Online softmax, starting from the new key (the mask always lets a token see itself), then slots [0, slot).
        best = tl.sum(q_first * k_first + q_second * k_second, axis=1) * scale  # [GROUP_P2]
        total = tl.full([GROUP_P2], 1.0, tl.float32)
        acc = tl.zeros([GROUP_P2, 2 * HALF], tl.float32) + value.to(tl.float32)[None, :]
        offsets = tl.arange(0, BLOCK)
        mask = mask_ptr + row * mask_row_stride
        for start in range(0, slot, BLOCK):
            slots = start + offsets
            visible = slots < slot
            keys = k_cache_ptr + cache_head + slots[:, None] * cache_slot_stride
            keys_first = tl.load(keys + half[None, :], mask=visible[:, None], other=0.0).to(tl.float32)
            keys_second = tl.load(keys + HALF + half[None, :], mask=visible[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q_first[:, None, :] * keys_first[None, :, :], axis=2)
            scores += tl.sum(q_second[:, None, :] * keys_second[None, :, :], axis=2)
            scores = scores * scale + tl.load(mask + slots, mask=visible, other=float("-inf")).to(tl.float32)[None, :]
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            values = v_cache_ptr + cache_head + slots[:, None] * cache_slot_stride + full[None, :]
            values = tl.load(values, mask=visible[:, None], other=0.0).to(tl.float32)
            acc = acc * rescale[:, None] + tl.sum(weights[:, :, None] * values[None, :, :], axis=1)
            total = total * rescale + tl.sum(weights, axis=1)
            best = new_best
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        out = out_ptr + row * out_row_stride + (kv_head * GROUP + members)[:, None] * dim + full[None, :]
        tl.store(out, (acc / total[:, None]).to(dtype), mask=real[:, None])


def launch_decode_attention(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    eps: float,
    qk_norm: bool,
    block: int = 64,
    warps: int = 4,
) -> torch.Tensor:
    """Run the kernel (block: cached slots per loop step; warps per program): qkv [batch, 1, (heads + 2 kv_heads) * head_dim], cos/sin [batch, 1, 1, head_dim / 2],
    slot [1] (the cache slot of the new token),
    mask [batch, 1, 1, keys] (additive, as the model builds it), caches [batch, kv_heads, slots, head_dim].
    Returns the attention output [batch, 1, heads * head_dim]; the caches hold the new key and value."""
    batch, kv_heads, _, dim = k_cache.shape
    group = heads // kv_heads
    out = qkv.new_empty(batch, 1, heads * dim)
    # Gathered the same way as cos/sin's broadcast in the model: one row per batch row.
    cos, sin = cos.expand(batch, 1, 1, dim // 2), sin.expand(batch, 1, 1, dim // 2)
    _decode_attention_kernel[(batch, kv_heads)](
        qkv, q_weight, k_weight, cos, sin, slot, mask, k_cache, v_cache, out,
        qkv.stride(0), cos.stride(0), mask.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        eps, dim**-0.5,
        HEADS=heads, GROUP=group, GROUP_P2=triton.next_power_of_2(group), HALF=dim // 2,
        BLOCK=block, QK_NORM=qk_norm, num_warps=warps, **dependent_launch(qkv.device),
    )  # fmt: skip
    return out


@torch.library.custom_op("qwen3gen::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    eps: float,
    qk_norm: bool,
) -> torch.Tensor:
    """The kernel as an operator that torch.compile records as one call (see launch_decode_attention)."""
    return launch_decode_attention(qkv, q_weight, k_weight, cos, sin, slot, mask, k_cache, v_cache, heads, eps, qk_norm)


@decode_attention.register_fake
def _(qkv, q_weight, k_weight, cos, sin, slot, mask, k_cache, v_cache, heads, eps, qk_norm):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape[0], 1, heads * k_cache.shape[-1])


def launch_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    swiglu: bool = False,
    settings: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """residual + linear(input) for one row x [1, 1, K] (or [1, 1, 2K] with swiglu), where input is x,
    RMSNorm(x) with norm_weight, or silu(gate) * up; weight [N, K], int8 with a scale per row or floating.
    settings (rows, columns per step, warps) fixes the launch; on CUDA they are otherwise tuned per shape."""
    n, k = weight.shape
    out = x.new_empty(1, 1, n)
    flags = dict(NORM=norm_weight is not None, SWIGLU=swiglu, SCALE=scale is not None, BIAS=bias is not None)
    flags.update(RESIDUAL=residual is not None, **dependent_launch(x.device))
    unused = weight  # any pointer for the inputs a flag switches off
    args = [x, weight, *(unused if t is None else t for t in (scale, bias, norm_weight, residual)), out, n, eps, k]
    if settings is None and x.device.type == "cuda":
        _matvec_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    else:
        rows, columns, warps = settings or (4, 256, 4)
        _matvec_kernel[(triton.cdiv(n, rows),)](*args, **flags, BLOCK_N=rows, BLOCK_K=columns, num_warps=warps)
    return out


@torch.library.custom_op("qwen3gen::matvec", mutates_args=())
def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    swiglu: bool,
) -> torch.Tensor:
    """launch_matvec as an operator that torch.compile records as one call."""
    return launch_matvec(x, weight, scale, bias, norm_weight, eps, residual, swiglu)


@matvec.register_fake
def _(x, weight, scale, bias, norm_weight, eps, residual, swiglu):  # noqa: ANN001, ANN202
    return x.new_empty(1, 1, weight.shape[0])
