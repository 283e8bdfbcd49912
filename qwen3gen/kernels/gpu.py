"""Hand-written Triton kernels for the CUDA steps: decode, where at batch 1 the step is bound by kernel count, and
attention over the paged pool for steps with prefill chunks.

A decode step reads every weight once, but at batch 1 on a GPU each kernel also costs a microsecond or more of
fixed time, and torch.compile makes about eleven kernels of each layer: norm statistics before each of the two
first products, q/k norm statistics, norm and rotation, two cache writes, attention and four products. Here one
layer is five (four products, and the new token's q/k/v with its attention):
- `matvec`: a matrix-vector product with what surrounds it inside: the RMSNorm before it (its statistics summed
  alongside the product, so no kernel of their own), SwiGLU before the down product, the residual add after
  o_proj and down, int8 weights with a scale per row. It loads its first weights before waiting for the kernel
  before it (programmatic dependent launch), as weights never change.
- `decode_step_attention`: q/k norm, rotation and the cache writes of each row's new token, then its attention over
  its context in the paged pool, of any length, one program per (row, key/value head), its query heads padded to 16
  rows for tensor-core products.
- `new_token`: the first half of that alone, for steps with prefill chunks (a program per token).
- `paged_attention`: causal attention of a step's new tokens of any mix (whole prompts, chunks after a cached
  context, decodes) over the pool, no padding, one program per (tile of a request's tokens, key/value head); the
  step's other work stays PyTorch's (new_token writes its keys and values, a program per token).
- `rms_norm`: an RMSNorm outside the products (the final one before the output head; an eager step's at batch > 1)
  in one kernel, where its PyTorch lines are eight.

The KV pool holds each layer's keys and values in blocks, [num_blocks, kv_heads, block_size, head_dim]; a row's
context slot j lies in block block_tables[row, j // block_size] at offset j % block_size (attention.py). The kernels
read the slots, block tables and context lengths from device memory and their grids and constexprs depend only on
shapes, so one launch (one CUDA graph per batch size) serves every length as contexts grow.

All are torch custom ops (new_token and decode_step_attention mutating the cache buffers), so torch.compile and CUDA
graphs see one opaque call each. The model uses them only on CUDA; the tests run the same kernels on CPU tensors
through Triton's interpreter (TRITON_INTERPRET=1) and compare them with the model's PyTorch lines.
"""

from __future__ import annotations

import functools

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
    return {"PDL": True, "launch_pdl": True} if _hopper_or_later(device) else {"PDL": False}


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    """Asked once per device, not at every launch of an eager decode step."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


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

    @triton.jit
    def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, x_row_stride, eps, K: tl.constexpr, BLOCK: tl.constexpr):
        """A row's RMSNorm, a program per row, computed as model.rms_norm computes it: the statistics in float32,
        the normed row rounded to the input's dtype, then times the weight, rounded to the output's."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < K
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=ok, other=0.0)
        x32 = x.to(tl.float32)
        scale = tl.rsqrt(tl.sum(x32 * x32, axis=0) * (1.0 / K) + eps)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        out = weight * (x32 * scale).to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * K + cols, out.to(out_ptr.dtype.element_ty), mask=ok)

    # (rows, columns per step, warps) tried once per matrix shape not in MATVEC_PINNED; triton.autotune times them with
    # the L2 cache flushed, as the model reads each weight from memory.
    MATVEC_SETTINGS = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (4, 256, 2), (16, 256, 4)]
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
    def _attend_slots(
        q, acc, best, total, k_cache_ptr, v_cache_ptr, table, table_col_stride, head, slots, stored, visible, scale,
        cache_block_stride, cache_slot_stride, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One step of online softmax: the rows of q attend to the pool slots `slots` of the table's blocks (those
        `stored` loaded, the scores `visible` [rows, slots] kept); returns acc, best, total updated."""
        blocks = tl.load(table + (slots // BLOCK_SIZE) * table_col_stride, mask=stored, other=0).to(tl.int64)
        cache = head + (blocks * cache_block_stride + (slots % BLOCK_SIZE) * cache_slot_stride)[:, None]
        k = tl.load(k_cache_ptr + cache, mask=stored[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(visible, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        weights = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        v = tl.load(v_cache_ptr + cache, mask=stored[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        return acc, new_best, total * rescale + tl.sum(weights, axis=1)

    @triton.jit
    def _attend_row(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, row, kv_head,
        cache_block_stride, cache_head_stride, cache_slot_stride, table_row_stride, table_col_stride, scale,
        HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """A row's query heads of one key/value head (padded to ROWS >= 16 rows for tl.dot) attend over the row's
        first seq_lens[row] slots, all visible, TILE slots a step (online softmax). Each step gathers the pool block
        of each of its slots from the row's block table, so a tile spans several pool blocks, or part of one: the
        tile keeps the width the tensor cores want whatever the block size (any, a power of two or not), and the
        slots of one block still lie side by side in memory. UPCAST: the products' operands in float32 (Triton
        3.9's interpreter gets tl.dot wrong on bf16). A row of length 0 (padding) gets zeros. PDL: let the next
        kernel launch before the output is stored."""
        dtype = out_ptr.dtype.element_ty
        length = tl.load(seq_lens_ptr + row)
        table = block_tables_ptr + row.to(tl.int64) * table_row_stride
        members = tl.arange(0, ROWS)
        real = members < GROUP
        dims = tl.arange(0, DIM)
        heads = (row * HEADS + kv_head * GROUP + members)[:, None] * DIM + dims[None, :]
        q = tl.load(q_ptr + heads, mask=real[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        head = kv_head * cache_head_stride + dims[None, :]
        offsets = tl.arange(0, TILE)
        for start in tl.range(0, length, TILE, num_stages=2):
            slots = start + offsets
            stored = slots < length  # every tile holds a visible slot: the sums stay finite
            acc, best, total = _attend_slots(
                q, acc, best, total, k_cache_ptr, v_cache_ptr, table, table_col_stride, head, slots, stored,
                stored[None, :], scale,
                cache_block_stride, cache_slot_stride, BLOCK_SIZE, PRECISION, UPCAST,
            )  # fmt: skip
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
        tl.store(out_ptr + heads, out.to(dtype), mask=real[:, None])

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_starts_ptr, seq_lens_ptr, tiles_ptr, out_ptr,
        num_tiles, cache_block_stride, cache_head_stride, cache_slot_stride, table_row_stride, table_col_stride, scale,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, QUERIES: tl.constexpr, ROWS: tl.constexpr,
        DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One program per (query tile, key/value head): QUERIES consecutive new tokens of one request, each with the
        query heads that share the key/value head (rows (query, member), GROUP_P2 members a query), attend causally
        over the request's context in the pool, TILE slots a step (online softmax), gathering each slot's block from
        the request's block table as _decode_attention_kernel does. A request's new tokens are the last of its
        context: token t of a request whose seq_lens is L and whose query_starts span holds n tokens is at position
        L - n + t and sees slots 0 to that position. Tile entries past the step's own (a request of -1) do nothing.
        ROWS >= QUERIES * GROUP_P2 rows (at least 16, for tl.dot); QUERIES = 1: the work list holds requests of one
        new token only (decodes), no first queries."""
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        request = tl.load(tiles_ptr + tile)
        if request < 0:
            return
        dtype = out_ptr.dtype.element_ty
        first = 0 if QUERIES == 1 else tl.load(tiles_ptr + num_tiles + tile)  # counted within the request
        start = tl.load(query_starts_ptr + request)
        count = tl.load(query_starts_ptr + request + 1) - start
        length = tl.load(seq_lens_ptr + request)
        rows = tl.arange(0, ROWS)
        query = first + rows // GROUP_P2
        member = rows % GROUP_P2
        real = (member < GROUP) & (query < count) & (rows < QUERIES * GROUP_P2)
        position = length - count + query
        dims = tl.arange(0, DIM)
        heads = ((start + query).to(tl.int64) * HEADS + kv_head * GROUP + member)[:, None] * DIM + dims[None, :]
        q = tl.load(q_ptr + heads, mask=real[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        table = block_tables_ptr + request.to(tl.int64) * table_row_stride
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        head = kv_head * cache_head_stride + dims[None, :]
        offsets = tl.arange(0, TILE)
        end = tl.minimum(length, length - count + first + QUERIES)  # past the tile's last query's position
        for key_start in tl.range(0, end, TILE, num_stages=2):
            slots = key_start + offsets
            stored = slots < end
            # Finite from the first tile on: slot 0 is visible to every query, so a tile a query sees none of
            # leaves its sums as they were.
            visible = stored[None, :] & (slots[None, :] <= position[:, None])
            acc, best, total = _attend_slots(
                q, acc, best, total, k_cache_ptr, v_cache_ptr, table, table_col_stride, head, slots, stored, visible,
                scale,
                cache_block_stride, cache_slot_stride, BLOCK_SIZE, PRECISION, UPCAST,
            )  # fmt: skip
        out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
        tl.store(out_ptr + heads, out.to(dtype), mask=real[:, None])

    @triton.jit
    def _new_token_kernel(
        qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, q_ptr,
        qkv_row_stride, rope_row_stride, cache_block_stride, cache_head_stride, cache_slot_stride, eps,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per (row, key/value head): _write_new_token."""
        if PDL:  # launched while the q/k/v product finishes; its output is read from here on
            tl.extra.cuda.gdc_wait()
        _write_new_token(
            qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, q_ptr,
            tl.program_id(0), tl.program_id(1), qkv_row_stride, rope_row_stride, cache_block_stride, cache_head_stride,
            cache_slot_stride, eps, HEADS, GROUP, GROUP_P2, HALF, BLOCK_SIZE, QK_NORM, PDL,
        )  # fmt: skip

    @triton.jit
    def _write_new_token(
        qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, q_ptr, row, kv_head,
        qkv_row_stride, rope_row_stride, cache_block_stride, cache_head_stride, cache_slot_stride, eps,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """A row's key head and its query heads normed and rotated, the key and value written to the row's pool slot
        (block slots[row] // BLOCK_SIZE, offset slots[row] % BLOCK_SIZE), the query heads to q [rows, heads, 1,
        head_dim]. PDL: let the next kernel launch before the stores."""
        dtype = k_cache_ptr.dtype.element_ty
        dim = 2 * HALF
        slot = tl.load(slots_ptr + row).to(tl.int64)
        half = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + row * rope_row_stride + half).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + row * rope_row_stride + half).to(tl.float32)[None, :]
        qkv = qkv_ptr + row * qkv_row_stride

        key = qkv + (HEADS + kv_head) * dim
        k_first, k_second = _norm_rotate(
            tl.load(key + half).to(tl.float32)[None, :], tl.load(key + HALF + half).to(tl.float32)[None, :],
            k_weight_ptr, cos, sin, eps, dtype, HALF, QK_NORM,
        )  # fmt: skip
        value = tl.load(qkv + (HEADS + tl.num_programs(1) + kv_head) * dim + tl.arange(0, 2 * HALF))
        members = tl.arange(0, GROUP_P2)  # the query heads that share this key/value head (rows past GROUP masked)
        real = members < GROUP
        query = qkv + (kv_head * GROUP + members)[:, None] * dim
        q_first, q_second = _norm_rotate(
            tl.load(query + half[None, :], mask=real[:, None], other=0.0).to(tl.float32),
            tl.load(query + HALF + half[None, :], mask=real[:, None], other=0.0).to(tl.float32),
            q_weight_ptr, cos, sin, eps, dtype, HALF, QK_NORM,
        )  # fmt: skip
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        cache_slot = block * cache_block_stride + kv_head * cache_head_stride + offset * cache_slot_stride
        tl.store(k_cache_ptr + cache_slot + half[None, :], k_first.to(dtype))
        tl.store(k_cache_ptr + cache_slot + HALF + half[None, :], k_second.to(dtype))
        tl.store(v_cache_ptr + cache_slot + tl.arange(0, 2 * HALF), value)
        q = q_ptr + (row * HEADS + kv_head * GROUP + members)[:, None] * dim + half[None, :]
        tl.store(q, q_first.to(dtype), mask=real[:, None])
        tl.store(q + HALF, q_second.to(dtype), mask=real[:, None])

    @triton.jit
    def _decode_step_attention_kernel(
        qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
        seq_lens_ptr, out_ptr, qkv_row_stride, rope_row_stride, cache_block_stride, cache_head_stride,
        cache_slot_stride, table_row_stride, table_col_stride, eps, scale,
        HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, ROWS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, QK_NORM: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """new_token then a decode step's attention in one program per (row, key/value head), a kernel a layer fewer:
        the query heads go to out (where the attention's output goes later), the key and value to the pool, and after a
        barrier (the program's own stores seen by all its threads) the row's heads attend as _attend_row."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        if PDL:
            tl.extra.cuda.gdc_wait()
        _write_new_token(
            qkv_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, out_ptr, row,
            kv_head, qkv_row_stride, rope_row_stride, cache_block_stride, cache_head_stride, cache_slot_stride, eps,
            HEADS, GROUP, GROUP_P2, HALF, BLOCK_SIZE, QK_NORM, False,
        )  # fmt: skip
        tl.debug_barrier()
        _attend_row(
            out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, row, kv_head,
            cache_block_stride, cache_head_stride, cache_slot_stride, table_row_stride, table_col_stride, scale, HEADS,
            GROUP, ROWS, 2 * HALF, BLOCK_SIZE, TILE, PRECISION, UPCAST, PDL,
        )  # fmt: skip


@torch.library.custom_op("qwen3gen::new_token", mutates_args=("k_cache", "v_cache"))
def new_token(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    eps: float,
    qk_norm: bool,
) -> torch.Tensor:
    """qkv [rows, 1, (heads + 2 kv_heads) * head_dim], cos/sin [rows, 1, 1, head_dim / 2], slots [rows] (the pool
    slot of each row's new token, block * block_size + offset), caches [num_blocks, kv_heads, block_size, head_dim].
    Writes the new keys and values to the pool and returns the query heads [rows, heads, 1, head_dim], normed
    (qk_norm) and rotated."""
    rows = qkv.shape[0]
    _, kv_heads, block_size, dim = k_cache.shape
    group = heads // kv_heads
    q = qkv.new_empty(rows, heads, 1, dim)
    _new_token_kernel[(rows, kv_heads)](
        qkv, q_weight, k_weight, cos, sin, slots, k_cache, v_cache, q,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), eps,
        HEADS=heads, GROUP=group, GROUP_P2=triton.next_power_of_2(group), HALF=dim // 2, BLOCK_SIZE=block_size,
        QK_NORM=qk_norm, num_warps=4, **dependent_launch(qkv.device),
    )  # fmt: skip
    return q


@new_token.register_fake
def _(qkv, q_weight, k_weight, cos, sin, slots, k_cache, v_cache, heads, eps, qk_norm):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape[0], heads, 1, k_cache.shape[-1])


@torch.library.custom_op("qwen3gen::decode_step_attention", mutates_args=("k_cache", "v_cache"))
def decode_step_attention(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, heads: int, eps: float, qk_norm: bool,
) -> torch.Tensor:  # fmt: skip
    """new_token's arguments, and the rows' block tables [rows, max_blocks] (int32) and context lengths seq_lens [rows]
    (their new slots included): attention of one new token per row over its first seq_lens[row] slots, all visible, in
    one kernel with the new keys' and values' writes (new_token's), [rows, heads, 1, head_dim]: what SDPA computes
    over the pool. Any length: the kernel reads seq_lens from device memory, and neither its grid nor its constexprs
    depend on them, so one launch (a CUDA graph) serves every length. The keys of one row are not split over programs
    (no flash-decoding), so long contexts at a small batch keep few SMs busy: rows x kv_heads programs."""
    rows = qkv.shape[0]
    _, kv_heads, block_size, dim = k_cache.shape
    group = heads // kv_heads
    out = qkv.new_empty(rows, heads, 1, dim)
    _decode_step_attention_kernel[(rows, kv_heads)](
        qkv, q_weight, k_weight, cos, sin, slots, k_cache, v_cache, block_tables, seq_lens, out,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *block_tables.stride(),
        eps, dim**-0.5, HEADS=heads, GROUP=group, GROUP_P2=triton.next_power_of_2(group),
        ROWS=max(16, triton.next_power_of_2(group)), HALF=dim // 2, BLOCK_SIZE=block_size, TILE=64, QK_NORM=qk_norm,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", UPCAST=qkv.device.type != "cuda", num_warps=4,
        **dependent_launch(qkv.device),
    )  # fmt: skip
    return out


@decode_step_attention.register_fake
def _(qkv, q_weight, k_weight, cos, sin, slots, k_cache, v_cache, block_tables, seq_lens, heads, eps, qk_norm):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape[0], heads, 1, k_cache.shape[-1])


@torch.library.custom_op("qwen3gen::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.rms_norm(x, weight, eps) over x's last axis (any leading shape) in one kernel, where its PyTorch lines
    are eight small ones: an eager step's norms outside the products, and the final norm before the output head."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(k)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), eps, K=k, BLOCK=block, num_warps=4)
    return out


@rms_norm.register_fake
def _(x, weight, eps):  # noqa: ANN001, ANN202
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


QUERY_ROWS = 64  # rows of a paged_attention program: query tokens times the query heads of one key/value head


def tile_queries(heads: int, kv_heads: int) -> int:
    """How many query tokens one paged_attention program takes: QUERY_ROWS rows, each token a row per query head
    of its key/value head (padded to a power of two)."""
    return max(1, QUERY_ROWS // triton.next_power_of_2(heads // kv_heads))


def query_tiles(query_lens: list[int], queries: int) -> tuple[list[int], list[int], list[int]]:
    """paged_attention's work lists, built on the host: the request and first query (within the request) of each
    tile of `queries` consecutive new tokens of the requests with several, and the requests with one (decodes, which
    run with one token a program: a tile of many would compute that many rows for one)."""
    requests, firsts, singles = [], [], []
    for request, n in enumerate(query_lens):
        if n == 1:
            singles.append(request)
            continue
        requests += [request] * -(-n // queries)
        firsts += range(0, n, queries)
    return requests, firsts, singles


@torch.library.custom_op("qwen3gen::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_starts: torch.Tensor, seq_lens: torch.Tensor, tiles: torch.Tensor, singles: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of a step's new tokens, q [tokens, heads, head_dim], requests side by side (request r's from
    query_starts[r] to query_starts[r + 1]), each over its first seq_lens[r] slots of the pool (its new ones last,
    already written) through block_tables [requests, max_blocks]: prefill chunks, whole prompts and single decode
    tokens in one step, with no padding and no gathered copy of the keys. tiles [2, n] and singles [m] (query_tiles'
    lists, -1 past the step's own so that a recorded step keeps its grids): the request and first query of each
    program's tokens, and the requests of one new token, each a program of its own (per key/value head)."""
    _, heads, dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = triton.next_power_of_2(heads // kv_heads)
    out = torch.empty_like(q)
    for work, queries in ((tiles, tile_queries(heads, kv_heads)), (singles, 1)):
        num_tiles = work.shape[-1]
        if num_tiles == 0:
            continue
        _paged_attention_kernel[(num_tiles, kv_heads)](
            q, k_cache, v_cache, block_tables, query_starts, seq_lens, work, out,
            num_tiles, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *block_tables.stride(), dim**-0.5,
            HEADS=heads, GROUP=heads // kv_heads, GROUP_P2=group, QUERIES=queries, ROWS=max(16, queries * group),
            DIM=dim, BLOCK_SIZE=block_size, TILE=64, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=q.device.type != "cuda", num_warps=4,
        )  # fmt: skip
    return out


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, query_starts, seq_lens, tiles, singles):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


PAGED_PREFILL = True  # paged_attention takes prefill chunks too: every step runs its attention here
MATVEC_ROWS = 1  # the Triton matvec takes one input row: a step of several requests runs the products as F.linear
FUSED_HEAD = False  # on CUDA cuBLAS reads the output head as fast as matvec would, so the model runs it as F.linear


# (rows per program, columns per step) for Qwen3-0.6B's four products, (N, K), 4 warps; other shapes are tuned. Timed
# alone, several settings come within noise of each other, and the tuning picked differently on every cold start, which
# made the engine's speed vary from start to start; these are the fastest start's picks (BENCHMARKS.md, history).
MATVEC_PINNED = {(4096, 1024): (4, 512), (1024, 2048): (2, 1024), (6144, 1024): (4, 1024), (1024, 3072): (2, 1024)}


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
    """residual + linear(input) * scale + bias for one row x [1, 1, K] (or [1, 1, 2K] with swiglu), where input is x,
    RMSNorm(x) with norm_weight, or silu(gate) * up; weight [N, K], int8 with a scale per row, or floating.
    On CUDA the launch settings are MATVEC_PINNED's or tuned per shape; elsewhere (Triton's interpreter) each loop
    step takes half a row, so that the tests run the loop."""
    n, k = weight.shape
    out = x.new_empty(1, 1, n)
    flags = dict(NORM=norm_weight is not None, SWIGLU=swiglu, SCALE=scale is not None, BIAS=bias is not None)
    flags.update(RESIDUAL=residual is not None, **dependent_launch(x.device))
    unused = weight  # any pointer for the inputs a flag switches off
    args = [x, weight, *(unused if t is None else t for t in (scale, bias, norm_weight, residual)), out, n, eps, k]
    settings = MATVEC_PINNED.get((n, k)) if x.device.type == "cuda" else (4, max(16, triton.next_power_of_2(k) // 2))
    if settings is None:
        _matvec_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    else:
        rows, cols = settings
        _matvec_kernel[(triton.cdiv(n, rows),)](*args, **flags, BLOCK_N=rows, BLOCK_K=cols, num_warps=4)
    return out


@matvec.register_fake
def _(x, weight, scale, bias, norm_weight, eps, residual, swiglu):  # noqa: ANN001, ANN202
    return x.new_empty(1, 1, weight.shape[0])
