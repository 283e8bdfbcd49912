"""One decode step of one attention layer over a paged pool, with a decode-kernel module (kernels/gpu.py,
kernels/cpu.py) or the reference lines (attention.PagedBatch.attend): what the kernel tests compare."""

from __future__ import annotations

from types import ModuleType

import torch

import qwen3gen
from qwen3gen.attention import AttentionBackend, PagedBatch
from qwen3gen.model import Attention, rotary_angles

BLOCK_SIZE = 16
SEQ_LENS = [75, 17, 4]  # context after the step: 5 blocks (the last part-full), 2 (one slot in the second), 1


def attention_config(shape: str) -> qwen3gen.Qwen3Config:
    """A small attention layer: "qwen3" (2 query heads per key/value head), "qwen3-group5" (5, as in Qwen3-14B) or
    "qwen2" (no q/k norms, biases on q/k/v)."""
    cfg = qwen3gen.Qwen3Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=64, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    if shape == "qwen3-group5":
        cfg = cfg.replace(num_attention_heads=10)
    if shape == "qwen2":
        cfg = cfg.replace(qk_norm=False, attention_bias=True)
    return cfg


def paged_pool(cfg: qwen3gen.Qwen3Config, dtype: torch.dtype, seq_lens: list[int], poison: bool, num_blocks: int = 20) -> tuple:
    """(keys, values [num_blocks, kv_heads, BLOCK_SIZE, head_dim], block tables [requests, blocks] int32, seq_lens
    [requests] int32): each request's blocks scattered over the pool in shuffled order. With poison, every slot that no
    request holds, and each request's last slot (where its new token goes), is NaN: a kernel that reads past a
    request's context, or before writing, poisons its output. (The reference gathers padding slots and multiplies them
    by zero weights, as a pool's stale, finite contents allow.)"""
    torch.manual_seed(1)
    shape = (num_blocks, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim)
    k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    order = (torch.randperm(num_blocks - 1) + 1).tolist()  # block 0 stays unused, as the engine's scratch block
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    held = torch.zeros(num_blocks, BLOCK_SIZE, dtype=torch.bool)
    for row, n in enumerate(seq_lens):
        for j in range(-(-n // BLOCK_SIZE)):
            tables[row, j] = order.pop()
        for slot in range(n - 1):
            held[tables[row, slot // BLOCK_SIZE], slot % BLOCK_SIZE] = True
    for cache in (k, v) if poison else ():
        cache.masked_fill_(~held[:, None, :, None], float("nan"))
    return k, v, tables, torch.tensor(seq_lens, dtype=torch.int32)


def attention_step(cfg: qwen3gen.Qwen3Config, dtype: torch.dtype, kernels: ModuleType | None) -> tuple:
    """One decode step of three requests (SEQ_LENS) over a paged pool: (output, keys, values). `kernels` is the module
    whose new_token and decode_attention run (over a poisoned pool), None for the reference lines."""
    torch.manual_seed(0)
    attn = Attention(cfg, 0).to(dtype)
    for norm in (attn.q_norm, attn.k_norm):
        if not isinstance(norm, torch.nn.Identity):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    k_cache, v_cache, tables, seq_lens = paged_pool(cfg, dtype, SEQ_LENS, poison=kernels is not None)
    positions = seq_lens.long() - 1
    slots = tables.long().gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE + positions % BLOCK_SIZE
    pool = [(k_cache, v_cache)]
    batch = PagedBatch.of(AttentionBackend(kernels), pool, slots, [1] * len(SEQ_LENS), SEQ_LENS, tables, dtype)
    rope = rotary_angles(positions[None], cfg.head_dim, cfg.rope_theta, dtype)
    x = torch.randn(1, len(SEQ_LENS), cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        out = attn(x, rope, batch)
    return out, k_cache, v_cache


def assert_same_step(fused: tuple, reference: tuple, dtype: torch.dtype) -> None:
    """Output and pools equal, float32 to rounding, bf16 and fp16 to a few steps of their precision (the kernels sum
    in another order); in the kernels' poisoned pool, exactly the requests' slots are not NaN (the new keys and values
    went to their slots and nowhere else)."""
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    assert torch.isfinite(fused[0]).all()
    torch.testing.assert_close(fused[0], reference[0], **tolerance)
    held = ~torch.isnan(fused[1])
    assert torch.equal(held, ~torch.isnan(fused[2])) and held.sum() == sum(SEQ_LENS) * fused[1][0, :, 0].numel()
    for ours, theirs in zip(fused[1:], reference[1:]):
        torch.testing.assert_close(ours[held], theirs[held], **tolerance)
