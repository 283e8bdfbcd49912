"""The CUDA decode kernels, run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), against the model's own PyTorch lines."""

import pytest
import torch
from decode_steps import assert_same_step, attention_config, attention_step

import qwen3gen
import qwen3gen.bench
import qwen3gen.quantize
from qwen3gen import kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["qwen3", "qwen3-group5", "qwen2"])
def test_new_token_kernel_matches_the_model(shape, dtype, monkeypatch):
    """Attention with the new_token kernel (q/k norm, rotation, cache writes) and decode_attention (two 64-slot blocks,
    the first all padding for the last row) equals the model's lines (the kernel rounds where the eager lines round,
    but computes the rotation in float32)."""
    assert kernels.triton is not None, "the kernel tests need triton (pip install -e '.[test]')"
    cfg = attention_config(shape)
    assert_same_step(attention_step(cfg, dtype, kernels, monkeypatch), attention_step(cfg, dtype, None, monkeypatch), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "norm", "swiglu+residual", "bias+residual", "int8"])
def test_matvec_matches_pytorch(case, dtype):
    """residual + linear(input) for input x, RMSNorm(x), SwiGLU(x); int8 weights with per-row scales. K = 96 runs
    the kernel's loop over 64-column steps twice, the second half-empty; N = 30 leaves the last 4-row program
    part empty."""
    torch.manual_seed(0)
    n, k = 30, 96
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    x = torch.randn(1, 1, 2 * k if "swiglu" in case else k, dtype=dtype)
    kwargs, inputs, scale = {}, x, None
    if case == "norm":
        norm = qwen3gen.model.RMSNorm(k, 1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        inputs = norm(x)
    if "swiglu" in case:
        inputs = torch.nn.functional.silu(x[..., :k]) * x[..., k:]
        kwargs.update(swiglu=True)
    if "bias" in case:
        kwargs.update(bias=torch.randn(n, dtype=dtype))
    if "residual" in case:
        kwargs.update(residual=torch.randn(1, 1, n, dtype=dtype))
    if case == "int8":
        int8 = qwen3gen.quantize.Int8Linear(weight)
        weight, scale = int8.weight, int8.scales
        expected = int8(x) if dtype == torch.float32 else torch.nn.functional.linear(x.float(), weight.float() * scale.float()[:, None])
    else:
        expected = torch.nn.functional.linear(inputs, weight, kwargs.get("bias"))
    if "residual" in case:
        expected = kwargs["residual"] + expected
    out = kernels.matvec(
        x, weight, scale, kwargs.get("bias"), kwargs.get("norm_weight"), kwargs.get("eps", 0.0), kwargs.get("residual"),
        kwargs.get("swiglu", False),
    )  # fmt: skip
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)


@pytest.mark.parametrize("quantized", [False, True])
def test_block_decodes_one_token_with_the_kernels(quantized, monkeypatch):
    """Block.decode_one_token (norms, SwiGLU and residual adds inside the products) equals Block.forward's lines."""
    cfg = qwen3gen.Qwen3Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=96, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = qwen3gen.bench.random_model(cfg, torch.device("cpu"), torch.float32)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(param, 1.0, 0.5)
    if quantized:
        qwen3gen.quantize.quantize(model, "int8")
    model.setup_cache(1, 80)
    prompt = torch.randint(0, 64, (1, 9))
    logits = []
    for fused in (None, kernels):  # the reference: the PyTorch lines
        monkeypatch.setattr(qwen3gen.model, "decode_kernels", lambda device: fused)
        with torch.no_grad():
            model(prompt, torch.arange(9))
            logits.append(model(torch.tensor([[5]]), torch.tensor([9])))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_greedy_with_the_kernels_equals_transformers(tiny_llm, tiny_hf, monkeypatch):
    """The whole decode path as it runs on CUDA (kernels on), here on CPU tensors, one row and a batch of two."""
    monkeypatch.setattr(qwen3gen.model, "decode_kernels", lambda device: kernels)
    prompts = ["Explain large language models.", "Hi"]
    ours = [r.token_ids for r in tiny_llm.generate(prompts, max_new_tokens=8, temperature=0.0, ignore_eos=True)]
    single = tiny_llm.generate(prompts[0], max_new_tokens=8, temperature=0.0, ignore_eos=True).token_ids
    ids = torch.tensor([tiny_llm.tokenizer.encode(prompts[0])])
    with torch.no_grad():
        expected = tiny_hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1] :].tolist()
    assert single == expected
    assert ours[0] == expected
