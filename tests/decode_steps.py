"""One decode step of one attention layer, with a decode-kernel module (kernels.py, cpu_kernels.py) or the PyTorch
lines: what the kernel tests compare."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import qwen3gen
from qwen3gen.model import Attention, KVCache, attention_mask, rotary_angles


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


def attention_step(cfg: qwen3gen.Qwen3Config, dtype: torch.dtype, fused: ModuleType | None, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """One decode step over the first 75 of 80 cache slots (more than one 64-slot block, not a multiple of 8), with
    left padding, the rest of the cache NaN (a kernel that reads past the mask poisons its output): (output, keys,
    values). `fused` is the module whose new_token and decode_attention run, None for the model's PyTorch lines."""
    torch.manual_seed(0)
    attn = Attention(cfg).to(dtype)
    for norm in (attn.q_norm, attn.k_norm):
        if not isinstance(norm, torch.nn.Identity):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    batch, slots, keys, slot = 3, 80, 75, 70
    attn.kv_cache = KVCache(batch, slots, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
    for cache in (attn.kv_cache.k, attn.kv_cache.v):
        cache.normal_()[:, :, keys:] = float("nan")
    pad = torch.tensor([0, 5, 66])  # the last row's only cached tokens are slots 66-69
    input_pos = torch.tensor([slot])
    positions = (input_pos[None, :] - pad[:, None]).clamp(min=0)
    rope = rotary_angles(positions, cfg.head_dim, cfg.rope_theta, dtype)
    mask = attention_mask(input_pos, keys, pad, dtype)
    x = torch.randn(batch, 1, cfg.hidden_size, dtype=dtype)
    monkeypatch.setattr(qwen3gen.model, "decode_kernels", lambda device: fused)
    with torch.no_grad():
        out = attn(x, rope, mask, input_pos)
    return out, attn.kv_cache.k.clone(), attn.kv_cache.v.clone()


def assert_same_step(fused: tuple, reference: tuple, dtype: torch.dtype) -> None:
    """Output and caches equal, float32 to rounding, bf16 and fp16 to a few steps of their precision (the kernels sum
    in another order); the new key went to slot 70 and nowhere else."""
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    assert torch.isfinite(fused[0]).all()
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours, theirs, equal_nan=True, **tolerance)
    assert torch.equal(fused[1][:, :, :70], reference[1][:, :, :70])
