"""Weight-only int8: the fused CPU kernel and the portable path agree, and the quality loss is measured."""

import pytest
import torch
import torch.nn.functional as F

import qwen3gen
from qwen3gen.loaders.quantize import Int8Linear, quantize_per_channel


def test_per_channel_round_trip():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * torch.linspace(0.01, 3, 64)[:, None]
    q, scales = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_fused_cpu_kernel_equals_portable_path():
    """The bf16 CPU kernel (torch._weight_int8pack_mm) and the dequantise-in-matmul path used on GPUs."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(96, 64, dtype=torch.bfloat16))
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    fused = layer(x)
    portable = F.linear(x.float(), layer.weight.float()) * layer.scales.float()
    assert fused.shape == (2, 3, 96)
    torch.testing.assert_close(fused.float(), portable, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer(x.float()), portable, atol=1e-4, rtol=1e-4)


def agreement_and_kl(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Share of positions with the same greedy token, and mean KL(reference || other) in nats."""
    p, q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return (p.argmax(-1) == q.argmax(-1)).float().mean().item(), (p.exp() * (p - q)).sum(-1).mean().item()


def test_quantized_model_quality(tiny_checkpoint):
    """Greedy agreement and mean KL divergence to the bf16 logits, teacher-forced on the bf16 greedy text.

    The float32 model's distance to bf16 is printed beside them: on random weights bf16 rounding alone
    flips near-tied greedy choices, so that is the floor int8 is judged against.
    """
    bf16 = qwen3gen.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    int8 = qwen3gen.load(tiny_checkpoint, device="cpu", quantization="int8")
    fp32 = qwen3gen.load(tiny_checkpoint, device="cpu", dtype="float32")
    assert int8.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(isinstance(m, Int8Linear) for m in (int8.model.lm_head, int8.model.layers[0].mlp.down_proj, int8.model.layers[1].self_attn.qkv_proj))
    prompt = bf16.tokenizer.encode("Explain large language models.")
    ids = torch.tensor([prompt + bf16.generate(prompt, max_new_tokens=48, temperature=0.0, ignore_eos=True).token_ids])
    with torch.inference_mode():
        reference = bf16.model(ids)
        int8_agree, int8_kl = agreement_and_kl(reference, int8.model(ids))
        floor_agree, floor_kl = agreement_and_kl(reference, fp32.model(ids))
    print(f"int8 vs bf16: greedy agreement {int8_agree:.0%}, mean KL {int8_kl:.1e} nats "
          f"(float32 vs bf16: {floor_agree:.0%}, {floor_kl:.1e})")
    assert int8_agree >= 0.7 and int8_kl < 2e-2
    assert int8_kl < 10 * floor_kl


@pytest.mark.slow
def test_compiled_int8_greedy_equals_eager_int8(tiny_checkpoint):
    """Compiling does not change what int8 generates (float32 activations: no bf16 near-ties to flip)."""
    eager = qwen3gen.load(tiny_checkpoint, device="cpu", dtype="float32", quantization="int8")
    compiled = qwen3gen.load(tiny_checkpoint, device="cpu", dtype="float32", quantization="int8", compile=True)
    for prompt in ("Explain large language models.", "Hi"):
        expected = eager.generate(prompt, max_new_tokens=24, temperature=0.0, ignore_eos=True).token_ids
        assert compiled.generate(prompt, max_new_tokens=24, temperature=0.0, ignore_eos=True).token_ids == expected


def test_unknown_quantization_is_refused(tiny_checkpoint):
    with pytest.raises(qwen3gen.InvalidParameterError, match="quantization must be one of int8, int4"):
        qwen3gen.load(tiny_checkpoint, device="cpu", quantization="int3")


def test_quantizing_holds_little_beside_the_model():
    """quantize converts a layer at a time and a large matrix a slice of rows at a time: while it runs, resident
    memory grows by a small part of the bf16 model (it held float32 copies of the whole output head, and every float
    layer until the end, peaking near twice the model). What stays is the tied head's int8 copy (the embedding keeps
    its bf16 table). Measured with the process's peak reset (Linux)."""
    from qwen3gen.bench import random_model
    from qwen3gen.loaders.quantize import quantize
    from qwen3gen.results import peak_memory, reset_peak_memory

    cfg = qwen3gen.preset("0.6B").replace(num_hidden_layers=4, hidden_size=512, intermediate_size=1536)
    model = random_model(cfg, torch.device("cpu"), torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert reset_peak_memory(torch.device("cpu")), "the tests run on Linux, whose peak resident size can be reset"
    before = peak_memory(torch.device("cpu"))[0]
    quantize(model, "int8")
    grown = peak_memory(torch.device("cpu"))[0] - before
    head = cfg.vocab_size * cfg.hidden_size  # bytes of its int8 copy
    assert grown < head + 0.1 * size, f"quantizing a {size / 2**20:.0f} MiB model took {grown / 2**20:.0f} MiB more"
