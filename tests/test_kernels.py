"""The CUDA decode-attention kernel, run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), against the model's own PyTorch lines."""

import pytest
import torch

import qwen3gen
from qwen3gen import kernels
from qwen3gen.model import Attention, attention_mask, rotary_angles


def attention_step(cfg: qwen3gen.Qwen3Config, dtype: torch.dtype, fused: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """One decode step of one attention layer over a half-filled cache with left padding: (output, keys, values)."""
    torch.manual_seed(0)
    attn = Attention(cfg).to(dtype)
    for norm in (attn.q_norm, attn.k_norm):
        if not isinstance(norm, torch.nn.Identity):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    batch, slots, slot = 3, 80, 70  # more than one 64-slot block of the kernel, the last partly used
    attn.kv_cache = qwen3gen.model.KVCache(batch, slots, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
    attn.kv_cache.k.normal_()
    attn.kv_cache.v.normal_()
    pad = torch.tensor([0, 5, 66])  # the last row's only cached tokens are slots 66-69
    input_pos = torch.tensor([slot])
    positions = (input_pos[None, :] - pad[:, None]).clamp(min=0)
    rope = rotary_angles(positions, cfg.head_dim, cfg.rope_theta, dtype)
    mask = attention_mask(input_pos, slots, pad, dtype)
    x = torch.randn(batch, 1, cfg.hidden_size, dtype=dtype)
    monkeypatch.setattr(kernels, "available", lambda device: fused)
    with torch.no_grad():
        out = attn(x, rope, mask, input_pos)
    return out, attn.kv_cache.k.clone(), attn.kv_cache.v.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["qwen3", "qwen3-group5", "qwen2"])
def test_fused_decode_attention_matches_the_model(shape, dtype, monkeypatch):
    """Same output and same cache writes as qk_norm, apply_rotary, KVCache.update and SDPA: float32 to rounding,
    bf16 to a few bf16 steps (the kernel rounds where the eager lines round, but sums in another order)."""
    assert kernels.triton is not None, "the kernel tests need triton (pip install '.[test]')"
    cfg = qwen3gen.Qwen3Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=64, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    if shape == "qwen3-group5":  # 5 query heads per key/value head, as in Qwen3-14B
        cfg = cfg.replace(num_attention_heads=10)
    if shape == "qwen2":
        cfg = cfg.replace(qk_norm=False, attention_bias=True)
    reference = attention_step(cfg, dtype, False, monkeypatch)
    fused = attention_step(cfg, dtype, True, monkeypatch)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours, theirs, **tolerance)
    # The new key went to slot 70 and nowhere else: the rest of the cache is untouched.
    assert torch.equal(fused[1][:, :, :70], reference[1][:, :, :70])
