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


if triton is not None:

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
        BLOCK: tl.constexpr, QK_NORM: tl.constexpr,
    ):  # fmt: skip
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
        BLOCK=block, QK_NORM=qk_norm, num_warps=warps,
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
