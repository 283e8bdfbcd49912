"""Attention over the paged KV cache: one step's layout (`PagedBatch`), the backend that runs it, and the PyTorch
reference every fast path is tested against.

The KV pool (engine/kv_pool.py) holds each layer's keys and values in fixed-size blocks, [num_blocks, kv_heads,
block_size, head_dim]; a request's block table lists its blocks in order, so its slot j lies in block
block_tables[row, j // block_size] at offset j % block_size, and "slot" below means block * block_size + offset.
A step runs the new tokens of every scheduled request as one flat sequence (no padding): a prefill chunk of many
tokens, or the one new token of a decode, side by side.

The backend is chosen once, when the engine is built (`choose_backend`): the reference (SDPA over keys gathered from
the pool) everywhere, and for decode steps the device's kernels where it has them (kernels/gpu.py's Triton kernels on
CUDA, kernels/cpu.py's C kernels on an AVX2 CPU), with one contract.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .kernels import cpu, gpu


@dataclass(frozen=True)
class AttentionBackend:
    """kernels: the module whose new_token and decode_attention (or decode_step_attention, both in one; and, at one
    token, matvec) run decode steps, or None (the reference)."""

    kernels: ModuleType | None

    @property
    def name(self) -> str:
        return "reference" if self.kernels is None else self.kernels.__name__.rpartition(".")[2]


def choose_backend(device: torch.device, kernels: bool = True) -> AttentionBackend:
    """Triton's kernels on CUDA, the C kernels on an AVX2 CPU, else (or with kernels=False) the reference."""
    chosen = None
    if kernels and gpu.available(device):
        chosen = gpu
    elif kernels and cpu.available(device):
        chosen = cpu
    return AttentionBackend(chosen)


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list (or tensor) as a tensor on the device, copied without waiting for the work queued there: a plain
    torch.tensor(values, device=...) waits for it, and so may a non-blocking copy of a small one from pageable memory
    (BENCHMARKS.md, the copy test), and with overlapped steps that is the step in flight. So on CUDA the values go
    through pinned memory (PyTorch's pinned allocator keeps the buffer until the copy has run)."""
    host = torch.tensor(values, dtype=dtype) if not isinstance(values, torch.Tensor) else values.to(dtype or values.dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


# For a masked call on CUDA: not cuDNN, which compiles a kernel for every new shape (and a step's padded layout has a
# new shape at almost every step); the memory-efficient kernel takes any mask.
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [batch, heads, queries, dim] over k, v [batch, kv_heads, keys, dim], mask additive [batch, 1,
    queries, keys] (None: causal, queries = keys). K/V are never repeated. Unmasked, SDPA's enable_gqa (flash
    attention); masked, the query heads that share a KV head are folded into the query axis, rows (group member,
    query), and the mask with them, where enable_gqa with a mask would fall back to the math kernel on a GPU (and is
    five times slower on a CPU). Both give the same numbers."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    batch, heads, queries, dim = q.shape
    group = heads // k.shape[1]
    folded, mask = q.reshape(batch, -1, group * queries, dim), mask.repeat(1, 1, group, 1)
    with sdpa_kernel(MASKED_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return out.reshape(batch, heads, queries, dim)  # reshape: an attention kernel may return another memory layout


@dataclass
class PagedBatch:
    """One step's requests in the pool, built once per step by the runner and read by every layer.

    slots [tokens]: where each new token's key and value go. seq_lens [requests]: tokens of context once they are
    written (the new ones are the last of it); query_starts [requests + 1]: request r's new tokens are the step's
    tokens query_starts[r] to query_starts[r + 1]. block_tables [requests, blocks]. decode: every request has exactly
    one new token (the case of the kernels' whole decode step). tiles, singles: the kernels' work lists of a step
    with prefill chunks (kernels/gpu.py, paged_attention); host_lens: the new tokens and context lengths of each
    request on the host, the shapes of the reference's layout (None where the step does not run that path).
    """

    backend: AttentionBackend
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # each layer's (keys, values) [num_blocks, kv_heads, block_size, dim]
    slots: torch.Tensor
    seq_lens: torch.Tensor
    query_starts: torch.Tensor
    block_tables: torch.Tensor
    decode: bool  # a field, not a property: compiled steps read it as a constant
    dtype: torch.dtype  # the activations'
    tiles: torch.Tensor | None = None
    singles: torch.Tensor | None = None
    host_lens: tuple[list[int], list[int]] | None = None
    rope_table: torch.Tensor | None = None  # model.rotary_table, where the step looks its angles up (recorded steps)

    @classmethod
    def of(
        cls, backend: AttentionBackend, caches: list, slots: torch.Tensor, query_lens: list[int], seq_lens: list[int],
        block_tables: torch.Tensor, dtype: torch.dtype, tile_queries: int = 0,
    ) -> "PagedBatch":  # fmt: skip
        """The batch of requests of query_lens new tokens and seq_lens slots of context (on the host), with the
        kernels' work list of `tile_queries` tokens a program where it is a step they attend as one launch; the
        lengths and the work list go to the device in one piece."""
        starts = list(itertools.accumulate(query_lens, initial=0))
        decode = max(query_lens) == 1
        work = ([], [], []) if decode or not tile_queries else backend.kernels.query_tiles(query_lens, tile_queries)
        lens = to_device(seq_lens + starts + work[0] + work[1] + work[2], slots.device, torch.int32)
        r, n = len(seq_lens), len(work[0])
        tiles, singles = lens[2 * r + 1 : 2 * r + 1 + 2 * n].view(2, -1), lens[2 * r + 1 + 2 * n :]
        return cls(
            backend, caches, slots, lens[:r], lens[r : 2 * r + 1], block_tables, decode, dtype,
            *((tiles, singles) if tile_queries and not decode else (None, None)), host_lens=(query_lens, seq_lens),
        )  # fmt: skip

    @property
    def kernels(self) -> ModuleType | None:
        """The kernels that run this step (new_token and attention, and the products at up to MATVEC_ROWS rows), or
        None (the reference lines): the backend's in a decode step, and in every step if they attend prefill chunks
        too (PAGED_PREFILL)."""
        kernels = self.backend.kernels
        return kernels if kernels is not None and (self.decode or kernels.PAGED_PREFILL) else None

    @property
    def head_kernels(self) -> ModuleType | None:
        """The kernels of the output head's product in any step: the head multiplies only the rows that are sampled,
        a matvec even in a prefill step (where the full product would decode every block of a GGUF head)."""
        return self.backend.kernels

    @property
    def block_size(self) -> int:
        return self.caches[0][0].shape[2]

    def attend_written(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The kernels' attention of q [tokens, heads, 1, dim] over each request's context, the new tokens' keys and
        values already in the pool (kernels.new_token wrote them): [tokens, heads, 1, dim]."""
        k_cache, v_cache = self.caches[layer]
        if self.decode:
            return self.kernels.decode_attention(q, k_cache, v_cache, self.block_tables, self.seq_lens)
        flat = q.view(q.shape[0], q.shape[1], q.shape[3])
        out = self.kernels.paged_attention(
            flat, k_cache, v_cache, self.block_tables, self.query_starts, self.seq_lens, self.tiles, self.singles
        )  # fmt: skip
        return out.view(q.shape)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' keys and values k, v [tokens, kv_heads, dim] at their slots."""
        k_cache, v_cache = self.caches[layer]
        blocks, offsets = self.slots // self.block_size, self.slots % self.block_size
        k_cache[blocks, :, offsets] = k
        v_cache[blocks, :, offsets] = v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k, v, then q [tokens, heads, dim] attends over each request's context in the pool, causally: returns
        [tokens, heads, dim]. The step's decoding requests (one new token) and its prefill chunks are two groups: the
        decodes run through the backend's decode_attention where it has one, else each group is one SDPA call over
        keys gathered from the pool, padded to the group's longest query and context (the reference). Two groups keep
        a long chunk's padding from multiplying over every decode of the step."""
        self.write(layer, k, v)
        k_cache, v_cache = self.caches[layer]
        out = None if len(self.groups) == 1 else q.new_empty(q.shape)
        for group in self.groups:
            if group.decode and self.backend.kernels is not None:
                part = self.backend.kernels.decode_attention(
                    q[group.tokens, :, None], k_cache, v_cache, group.block_tables, group.seq_lens
                )[:, :, 0]  # fmt: skip
            else:
                keys = k_cache[group.key_blocks, :, group.key_offsets].transpose(1, 2)  # [requests, kv_heads, keys, dim]
                values = v_cache[group.key_blocks, :, group.key_offsets].transpose(1, 2)
                queries = q[group.query_rows].transpose(1, 2)  # [requests, heads, queries, dim]
                part = sdpa(queries, keys, values, group.mask).transpose(1, 2).flatten(0, 1)[group.query_valid]
            if out is None:
                return part
            out[group.tokens] = part
        return out

    @functools.cached_property
    def groups(self) -> list["Group"]:
        """The step's decodes and its prefill chunks (one group when there is one kind), computed once for all layers."""
        query_lens, seq_lens = self.host_lens
        starts = list(itertools.accumulate(query_lens, initial=0))
        kinds = [[i for i, n in enumerate(query_lens) if (n == 1) == decode] for decode in (True, False)]
        return [Group.of(self, rows, query_lens, seq_lens, starts, decode) for rows, decode in zip(kinds, (True, False)) if rows]


@dataclass
class Group:
    """Requests of one step attended together: their tokens, and the reference's padded layout of them."""

    decode: bool
    tokens: torch.Tensor  # [group tokens]: where they are among the step's tokens
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_rows: torch.Tensor  # [requests, max query]: the step's token of each padded query
    query_valid: torch.Tensor  # [group tokens]: where the real queries are among the padded ones, flattened
    key_blocks: torch.Tensor  # [requests, max context]: block and offset of each context slot
    key_offsets: torch.Tensor
    mask: torch.Tensor | None  # [requests, 1, max query, max context] additive, in the activations' dtype; None: causal

    @classmethod
    def of(
        cls, batch: PagedBatch, rows: list[int], query_lens: list[int], seq_lens: list[int], starts: list[int],
        decode: bool,
    ) -> "Group":  # fmt: skip
        device = batch.slots.device
        tokens = to_device([t for r in rows for t in range(starts[r], starts[r] + query_lens[r])], device)
        max_query, max_seq = max(query_lens[r] for r in rows), max(seq_lens[r] for r in rows)
        flat = [i * max_query + t for i, r in enumerate(rows) for t in range(query_lens[r])]  # on the host: no sync
        valid = to_device(flat, device)
        picked = to_device(rows, device)
        tables, lens = batch.block_tables[picked], batch.seq_lens[picked]
        q_lens = to_device([query_lens[r] for r in rows], device)
        local = torch.cumsum(q_lens, 0) - q_lens  # each request's first token within the group
        i = torch.arange(max_query, device=device)
        j = torch.arange(max_seq, device=device)
        query_rows = tokens[(local[:, None] + i).clamp(max=len(tokens) - 1)]
        size = batch.block_size
        key_blocks = tables.long().gather(1, (j // size).clamp(max=tables.shape[1] - 1).expand(len(rows), -1))
        mask = None  # a whole prompt alone: plain causal attention
        if len(rows) > 1 or query_lens[rows[0]] < seq_lens[rows[0]]:
            positions = lens.long()[:, None] - q_lens[:, None] + i  # each query's position in its request
            allowed = (j <= positions[:, :, None]) & (j < lens.long()[:, None, None])
            allowed |= (i >= q_lens[:, None])[:, :, None] & (j == 0)  # a padding query sees one slot: no empty row, no NaN
            mask = torch.zeros(allowed.shape, dtype=batch.dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]
        return cls(decode, tokens, tables, lens, query_rows, valid, key_blocks, (j % size).expand_as(key_blocks), mask)
