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

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .kernels import cpu, gpu


@dataclass(frozen=True)
class AttentionBackend:
    """kernels: the module whose new_token / decode_attention (and, at one token, matvec) run decode steps, or None
    (the reference). fold: fold a KV head's query heads into the query axis for SDPA (faster on CPU, see `sdpa`)."""

    kernels: ModuleType | None
    fold: bool

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
    return AttentionBackend(chosen, fold=device.type == "cpu")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, fold: bool) -> torch.Tensor:
    """Attention of q [batch, heads, queries, dim] over k, v [batch, kv_heads, keys, dim], mask additive [batch, 1,
    queries, keys] (None: causal, queries = keys). K/V are never repeated. fold=True folds the query heads that share a
    KV head into the query axis, rows (group member, query), and the mask with them: on CPU five times faster than
    SDPA's enable_gqa, where on the H200 enable_gqa (cuDNN) is the faster. Both give the same numbers."""
    if not fold or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    batch, heads, queries, dim = q.shape
    group = heads // k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(batch, -1, group * queries, dim), k, v, attn_mask=mask.repeat(1, 1, group, 1))
    return out.reshape(batch, heads, queries, dim)  # reshape: an attention kernel may return another memory layout


@dataclass
class PagedBatch:
    """One step's requests in the pool, built once per step by the runner and read by every layer.

    slots [tokens]: where each new token's key and value go. query_lens, seq_lens [requests]: new tokens, and tokens
    of context once they are written (the new ones are the last query_lens of it). block_tables [requests, blocks].
    decode: every request has exactly one new token (the kernels' case).
    """

    backend: AttentionBackend
    caches: list[tuple[torch.Tensor, torch.Tensor]]  # each layer's (keys, values) [num_blocks, kv_heads, block_size, dim]
    slots: torch.Tensor
    query_lens: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    dtype: torch.dtype  # the activations'

    @property
    def decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def kernels(self) -> ModuleType | None:
        """The decode kernels to use in this step, or None (the reference lines)."""
        return self.backend.kernels if self.decode else None

    @property
    def block_size(self) -> int:
        return self.caches[0][0].shape[2]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' keys and values k, v [tokens, kv_heads, dim] at their slots."""
        k_cache, v_cache = self.caches[layer]
        blocks, offsets = self.slots // self.block_size, self.slots % self.block_size
        k_cache[blocks, :, offsets] = k
        v_cache[blocks, :, offsets] = v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The reference: write k, v, then q [tokens, heads, dim] attends over each request's context gathered from the
        pool, causally: returns [tokens, heads, dim]. Requests are padded to the longest query and context of the step
        (masked, never read as values), so the whole step is one SDPA call."""
        self.write(layer, k, v)
        k_cache, v_cache = self.caches[layer]
        gather = self.gather
        keys = k_cache[gather.key_blocks, :, gather.key_offsets].transpose(1, 2)  # [requests, kv_heads, keys, dim]
        values = v_cache[gather.key_blocks, :, gather.key_offsets].transpose(1, 2)
        queries = q[gather.query_rows].transpose(1, 2)  # [requests, heads, queries, dim]
        out = sdpa(queries, keys, values, gather.mask, self.backend.fold)
        return out.transpose(1, 2)[gather.query_valid]

    @functools.cached_property
    def gather(self) -> "Gather":
        return Gather.of(self)


@dataclass
class Gather:
    """The reference's padded layout of one step, computed once for all layers."""

    query_rows: torch.Tensor  # [requests, max_query_len]: the flat token of each padded query
    query_valid: torch.Tensor  # [requests, max_query_len] bool
    key_blocks: torch.Tensor  # [requests, max_seq_len]: block and offset of each context slot
    key_offsets: torch.Tensor
    mask: torch.Tensor  # [requests, 1, max_query_len, max_seq_len] additive, in the activations' dtype

    @classmethod
    def of(cls, batch: PagedBatch) -> "Gather":
        device = batch.slots.device
        query_lens, seq_lens = batch.query_lens.long(), batch.seq_lens.long()
        starts = torch.cumsum(query_lens, 0) - query_lens
        i = torch.arange(batch.max_query_len, device=device)
        j = torch.arange(batch.max_seq_len, device=device)
        query_valid = i < query_lens[:, None]
        query_rows = (starts[:, None] + i).clamp(max=batch.slots.shape[0] - 1)
        size = batch.block_size
        key_blocks = batch.block_tables.long().gather(1, (j // size).clamp(max=batch.block_tables.shape[1] - 1).expand(len(seq_lens), -1))
        positions = seq_lens[:, None] - query_lens[:, None] + i  # each query's position in its request
        allowed = (j <= positions[:, :, None]) & (j < seq_lens[:, None, None])
        allowed |= ~query_valid[:, :, None] & (j == 0)  # a padding query sees one slot: no empty row, no NaN
        mask = torch.zeros(allowed.shape, dtype=batch.dtype, device=device).masked_fill_(~allowed, float("-inf"))[:, None]
        return cls(query_rows, query_valid, key_blocks, (j % size).expand_as(key_blocks), mask)
