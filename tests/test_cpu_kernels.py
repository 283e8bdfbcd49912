"""The CPU decode step's kernels (cpu_kernels.c, built by cpu_kernels.py) against the model's own PyTorch lines, and the
2 MiB-page weight block."""

import pytest
import torch
import torch.nn.functional as F
from decode_steps import assert_same_step, attention_config, attention_step

import qwen3gen
import qwen3gen.bench
import qwen3gen.quantize
from qwen3gen import cpu_kernels
from qwen3gen.model import RMSNorm

CPU = torch.device("cpu")


def tiny_config(**overrides: object) -> qwen3gen.Qwen3Config:
    cfg = qwen3gen.Qwen3Config(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=100, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    return cfg.replace(**overrides)


def test_the_kernel_is_built_on_this_machine():
    """On x86-64 with AVX2 (this machine and CI) the kernel must build: a silent fallback would hide a broken build."""
    if cpu_kernels.cpu_supported():
        assert cpu_kernels.available(CPU), cpu_kernels.unavailable_reason()
    else:
        assert not cpu_kernels.available(CPU) and cpu_kernels.unavailable_reason()
    assert not cpu_kernels.available(torch.device("meta"))


requires_kernel = pytest.mark.skipif(not cpu_kernels.available(CPU), reason="no AVX2 here: test_the_kernel_is_built_on_this_machine says why")


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "norm", "swiglu+residual", "bias+residual", "int8", "int8+norm"])
def test_matvec_matches_pytorch(case, dtype):
    """residual + linear(input) for input x, RMSNorm(x), SwiGLU(x); int8 weights with per-row scales. K = 100 leaves a
    tail of 36 after the 64-wide step; N = 301 rows split unevenly between threads."""
    torch.manual_seed(0)
    n, k = 301, 100
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    x = torch.randn(1, 1, 2 * k if "swiglu" in case else k, dtype=dtype)
    kwargs, inputs, scale = {}, x, None
    if "norm" in case:
        norm = RMSNorm(k, 1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        inputs = norm(x)
    if "swiglu" in case:
        inputs = F.silu(x[..., :k]) * x[..., k:]
        kwargs.update(swiglu=True)
    if "bias" in case:
        kwargs.update(bias=torch.randn(n, dtype=dtype))
    if "int8" in case:
        int8 = qwen3gen.quantize.Int8Linear(weight)
        weight, scale = int8.weight, int8.scales
        expected = F.linear(inputs.float(), weight.float() * scale.float()[:, None])
    else:
        expected = F.linear(inputs.float(), weight.float(), None if "bias" not in kwargs else kwargs["bias"].float())
    if "residual" in case:
        kwargs.update(residual=torch.randn(1, 1, n, dtype=dtype))
        expected = kwargs["residual"].float() + expected.to(dtype).float()
    out = cpu_kernels.matvec(
        x, weight, scale, kwargs.get("bias"), kwargs.get("norm_weight"), kwargs.get("eps", 0.0), kwargs.get("residual"),
        kwargs.get("swiglu", False),
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == (1, 1, n)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.01)
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **tolerance)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["qwen3", "qwen3-group5", "qwen2"])
def test_attention_kernels_match_the_model(shape, dtype, monkeypatch):
    """new_token (q/k norm, rotation, cache writes) and decode_attention over 75 slots with left padding, for three
    rows at once: the same output and caches as the model's lines, which never read past the mask either."""
    cfg = attention_config(shape)
    assert_same_step(attention_step(cfg, dtype, cpu_kernels, monkeypatch), attention_step(cfg, dtype, None, monkeypatch), dtype)


@requires_kernel
def test_decode_attention_over_a_long_cache():
    """Thousands of slots, half of them masked, scores spread wide (softmax weights from 1 down to underflow): SDPA's
    numbers, float32."""
    torch.manual_seed(0)
    keys = 3001
    q, k, v = torch.randn(2, 16, 1, 64) * 3, torch.randn(2, 8, keys + 7, 64) * 3, torch.randn(2, 8, keys + 7, 64)
    mask = torch.zeros(2, 1, 1, keys).masked_fill_(torch.rand(2, 1, 1, keys) < 0.5, float("-inf"))
    mask[..., 7] = 0.0  # every row sees at least one slot
    expected = F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys], attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cpu_kernels.decode_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)


@requires_kernel
def test_the_kernels_refuse_what_would_reach_outside_their_tensors():
    """A slot past the cache, more keys than slots, an input of the wrong size, mixed types: an exception, never a
    write or read outside the tensors."""
    cache = torch.zeros(1, 2, 8, 32)
    qkv, cos, sin, weight = torch.zeros(1, 1, 256), torch.ones(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.ones(32)
    with pytest.raises(IndexError):
        cpu_kernels.new_token(qkv, weight, weight, cos, sin, torch.tensor([8]), cache, cache.clone(), 4, 1e-6, True)
    with pytest.raises(TypeError):
        cpu_kernels.new_token(qkv, weight, weight, cos, sin, torch.tensor([7]), cache.bfloat16(), cache.bfloat16(), 4, 1e-6, True)
    with pytest.raises(IndexError):
        cpu_kernels.decode_attention(torch.zeros(1, 4, 1, 32), cache, cache, torch.zeros(1, 1, 1, 9))
    with pytest.raises(ValueError):
        cpu_kernels.matvec(torch.zeros(1, 1, 31), torch.zeros(5, 32), None, None, None, 0.0, None, False)
    with pytest.raises(TypeError):
        cpu_kernels.matvec(torch.zeros(1, 1, 32), torch.zeros(32, 5).t(), None, None, None, 0.0, None, False)


def decode_logits(model: qwen3gen.Qwen3, fused: bool, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Logits of a prefill, then of three one-token decode steps, with the kernel on or off."""
    monkeypatch.setattr(cpu_kernels, "available", lambda device: fused)
    model.setup_cache(1, 32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [model(prompt, torch.arange(9))[:, -1:]]
        for i, token in enumerate([5, 17, 3]):
            logits.append(model(torch.tensor([[token]]), torch.tensor([9 + i])))
    return torch.cat(logits, dim=1)


@requires_kernel
@pytest.mark.parametrize("variant", ["tied", "untied", "int8", "qwen2"])
def test_decode_steps_with_the_kernel_equal_the_pytorch_lines(variant, monkeypatch):
    """Block.decode_one_token (norms, SwiGLU and residual adds inside the products) and the output head with the final
    norm inside, against Block.forward and Qwen3.forward's lines, float32."""
    overrides = {"untied": dict(tie_word_embeddings=False), "qwen2": dict(qk_norm=False, attention_bias=True)}
    model = qwen3gen.bench.random_model(tiny_config(**overrides.get(variant, {})), CPU, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                torch.nn.init.normal_(param, 1.0, 0.5)
    if variant == "int8":
        qwen3gen.quantize.quantize(model, "int8")
    reference = decode_logits(model, False, monkeypatch)
    fused = decode_logits(model, True, monkeypatch)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


@requires_kernel
def test_compiled_decode_uses_the_kernel_without_graph_breaks():
    """The kernels are custom ops: a compiled block calls them inside its one graph."""
    model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.float32)
    model.setup_cache(1, 32)
    block = model.layers[0]
    x, mask, rope = torch.randn(1, 1, 64), torch.zeros(1, 1, 1, 32), model.step_inputs(torch.tensor([3]), torch.zeros(1, dtype=torch.long), 32, torch.float32)[1]
    explanation = torch._dynamo.explain(block)(x, rope, mask, torch.tensor([3]))
    assert explanation.graph_break_count == 0
    graph = str(explanation.graphs[0].graph)
    assert all(f"qwen3gen.cpu_{op}" in graph for op in ("matvec", "new_token", "decode_attention"))


@requires_kernel
def test_a_compiled_cpu_engine_compiles_prefill_only():
    """With the kernels, a decode step is all kernel calls: a compiled engine runs it eagerly (dynamo's guards and the
    op dispatcher would only add time) and compiles its prefill."""
    from qwen3gen.generate import Engine

    counters = torch._dynamo.utils.counters["stats"]
    engine = Engine(qwen3gen.bench.random_model(tiny_config(), CPU, torch.float32), compile=True)
    engine.ensure_cache(1, 48)
    pad, graphs = torch.zeros(1, dtype=torch.long), counters["unique_graphs"]
    with torch.inference_mode():
        engine.step(torch.tensor([[5]]), torch.tensor([3]), pad, 64)
        assert counters["unique_graphs"] == graphs
        engine.step(torch.zeros(1, 16, dtype=torch.long), torch.arange(16), pad, 64)
    assert counters["unique_graphs"] > graphs


def test_huge_page_weights_moves_every_tensor_and_keeps_ties():
    """Every parameter and buffer lands in the block with the same values; a tied embedding stays one Parameter; a
    second call does nothing."""
    model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.bfloat16)
    qwen3gen.quantize.quantize(model, "int8")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    cpu_kernels.huge_page_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        addresses = sorted(t.data_ptr() for t in after.values())
        assert all(address % 64 == 0 for address in addresses)
        assert addresses[-1] - addresses[0] < 2 * sum(t.numel() * t.element_size() for t in after.values())  # one block
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter)
    snapshot = [t.data_ptr() for t in model.state_dict().values()]
    cpu_kernels.huge_page_weights(model)
    assert [t.data_ptr() for t in model.state_dict().values()] == snapshot


def test_a_failed_build_leaves_the_pytorch_lines_and_no_file(tmp_path, monkeypatch):
    """A compiler that fails: the kernel is unavailable with the compiler's reason, the model decodes with its PyTorch
    lines, and nothing half-built is left in the cache."""
    monkeypatch.setenv("QWEN3GEN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_kernels._library.cache_clear()
    try:
        if cpu_kernels.cpu_supported():
            assert not cpu_kernels.available(CPU)
            assert "could not build the CPU kernel" in cpu_kernels.unavailable_reason()
        assert list(tmp_path.iterdir()) == []
        model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.float32)
        model.setup_cache(1, 16)
        with torch.no_grad():
            model(torch.tensor([[1, 2]]), torch.arange(2))
            assert torch.isfinite(model(torch.tensor([[3]]), torch.tensor([2]))).all()
    finally:
        monkeypatch.undo()
        cpu_kernels._library.cache_clear()
    assert cpu_kernels.available(CPU) == (cpu_kernels.unavailable_reason() == "")
