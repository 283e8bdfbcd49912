"""GGML's block formats held as they are (loaders/blocks.py, the block kernels of kernels/cpu.c): every format's
kernels against the gguf package's numpy lines and the PyTorch lines, for every instruction set this CPU has (the
others are skipped, by name); GGUF files of mixed formats through the model against the same file dequantized at
load; the file left unmodified; int4 (Q4_0) quantization of a Hugging Face checkpoint and its quality."""

import hashlib
import warnings

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import write_checkpoint
from gguf import GGMLQuantizationType as Q
from test_gguf import IDS, SMALL_VOCAB, logits, random_blocks, small_checkpoint, write_gguf
from test_quantize import agreement_and_kl

import qwen3gen
from qwen3gen.kernels import cpu
from qwen3gen.loaders import blocks
from qwen3gen.loaders.blocks import BlockEmbedding, BlockLinear
from qwen3gen.loaders.gguf import GGUFCheckpoint
from qwen3gen.loaders.quantize import check_quantization
from qwen3gen.model import RMSNorm

FORMATS = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
WRITABLE = (Q.Q8_0, Q.Q4_0, Q.Q5_0)  # the gguf package quantizes these; the K formats it only reads


@pytest.fixture(params=list(cpu.ISAS))
def isa(request, monkeypatch):
    """Each instruction set's library in turn, where this CPU has it (a skip names the one it lacks)."""
    if request.param not in cpu.supported_isas():
        pytest.skip(f"this CPU has no {request.param} (it has {', '.join(cpu.supported_isas()) or 'none'})")
    monkeypatch.setenv("QWEN3GEN_CPU_ISA", request.param)
    assert cpu.available(torch.device("cpu")), cpu.unavailable_reason()
    return request.param


def block_rows(qtype: Q, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Rows of blocks written by the gguf package: quantized random weights where it can, else random blocks."""
    if qtype in WRITABLE:
        weights = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
        weights[0, :32] = 0.0  # a block of zeros (scale 0)
        return gguf.quants.quantize(weights, qtype)
    return random_blocks(qtype, rows, k, seed)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_dequantize_equals_the_gguf_package(isa, qtype):
    """The same bits as the gguf package's numpy lines: the kernel in float32 (and rounded to bf16 and fp16) and the
    PyTorch reference lines."""
    k = 512
    raw = block_rows(qtype, 37, k)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert expected.isfinite().all() and expected.abs().max() > 0
    rows = torch.from_numpy(raw)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(cpu.dequantize(rows, int(qtype), k, dtype), expected.to(dtype)), dtype
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    assert torch.equal(blocks.reference_dequantize(rows.reshape(-1, size), int(qtype)).reshape(37, k), expected)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "norm", "swiglu+residual", "bias+residual"])
@pytest.mark.parametrize("rows", [1, 5])
def test_block_matvec_equals_dequantize_then_pytorch(isa, qtype, dtype, case, rows):
    """residual + linear(input) + bias with the weight as blocks, for x, RMSNorm(x) and SwiGLU(x), one input row and
    several (each weight row decoded once for all of them); N = 37 rows split unevenly between threads."""
    torch.manual_seed(0)
    n, k = 37, 512
    raw = torch.from_numpy(block_rows(qtype, n, k))
    weight = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype))
    x = (torch.randn(1, rows, 2 * k if "swiglu" in case else k) * torch.linspace(0.5, 4.0, rows)[:, None]).to(dtype)
    inputs, norm_weight, bias, residual = x, None, None, None
    if "norm" in case:
        norm = RMSNorm(k, 1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        norm_weight, inputs = norm.weight, norm(x)
    if "swiglu" in case:
        inputs = F.silu(x[..., :k]) * x[..., k:]
    if "bias" in case:
        bias = torch.randn(n, dtype=dtype)
    expected = F.linear(inputs.float(), weight, None if bias is None else bias.float())
    if "residual" in case:
        residual = torch.randn(1, rows, n, dtype=dtype)
        expected = residual.float() + expected.to(dtype).float()
    out = cpu.block_matvec(x, [raw], [int(qtype)], k, bias, norm_weight, 1e-6, residual, "swiglu" in case)
    assert out.dtype == dtype and out.shape == (1, rows, n)
    scale = expected.abs().max().item()
    tolerance = dict(atol=1e-5 * scale, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.01 * scale, rtol=0.01)
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **tolerance)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_decode_product_is_the_exact_product_rounded(isa, qtype, dtype):
    """One 16-bit input row (bf16 on AVX-512: multiplied in integers, make_words, or make_bytes for Q4_K and Q5_K):
    each output is within its rounding to the output's type of the float64 product of the dequantized weights and the
    input, plus what the integers' rounding can cost, each value off by at most 2^-16 (make_bytes: 2^-15) of its
    group's largest (a block, or a K superblock). The input spans 2^12 within its groups, so that some of its values
    do lose bits."""
    torch.manual_seed(0)
    group = 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 32
    n, k = 256, 512 if group == 256 else 544  # 17 blocks: the last of an odd count alone
    raw = torch.from_numpy(block_rows(qtype, n, k))
    weight = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).double()
    x = (torch.randn(1, 1, k) * torch.logspace(-6, 6, k, base=2.0)[torch.randperm(k)]).to(dtype)
    out = cpu.block_matvec(x, [raw], [int(qtype)], k, None, None, 0.0, None, False).double()
    exact = F.linear(x.double(), weight)
    largest = x.double().abs().view(k // group, group).amax(1).repeat_interleave(group)
    as_bytes = isa != "avx2" and dtype == torch.bfloat16 and qtype in (Q.Q4_K, Q.Q5_K)
    words = F.linear(largest, weight.abs()) * 2.0 ** (-15 if as_bytes else -16)
    bound = words + (exact.abs() + words) * torch.finfo(dtype).eps + 1e-6 * F.linear(x.double().abs(), weight.abs())
    assert ((out - exact).abs() <= bound).all()
    # Most are the exact product, rounded (fewer through make_bytes, whose integers keep a bit less).
    assert (out == exact.to(dtype).double()).float().mean() > (0.85 if as_bytes else 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_parts_of_several_formats_in_one_call_are_each_part_alone(isa, dtype, rows):
    """A layer stacked from parts of every word layout (Q8_0's, Q4_0's pairs, the K formats'): one call is each part's
    own call, side by side, with the norm inside and a bias and residual across the parts' rows."""
    torch.manual_seed(0)
    k, sizes = 512, {Q.Q4_K: 5, Q.Q8_0: 3, Q.Q4_0: 7, Q.Q6_K: 4}
    raws = [torch.from_numpy(block_rows(qtype, n, k, seed=i)) for i, (qtype, n) in enumerate(sizes.items())]
    types = [int(qtype) for qtype in sizes]
    n = sum(sizes.values())
    x, norm = torch.randn(1, rows, k).to(dtype), (torch.rand(k) + 0.5).to(dtype)
    bias, residual = torch.randn(n, dtype=dtype), torch.randn(1, rows, n, dtype=dtype)
    together = cpu.block_matvec(x, raws, types, k, bias, norm, 1e-6, residual, False)
    alone, start = [], 0
    for raw, qtype in zip(raws, types):
        stop = start + raw.shape[0]
        alone.append(cpu.block_matvec(x, [raw], [qtype], k, bias[start:stop], norm, 1e-6, residual[..., start:stop], False))
        start = stop
    assert torch.equal(together, torch.cat(alone, dim=-1))
    with pytest.raises(ValueError, match="one block type per part"):
        cpu.block_matvec(x, raws, types[:2], k, None, None, 0.0, None, False)


def test_the_block_kernels_refuse_a_wrong_shape():
    raw = torch.from_numpy(block_rows(Q.Q4_K, 4, 512))
    with pytest.raises(ValueError, match="a row of 256 weights is 1 blocks of 144 bytes"):
        cpu.block_matvec(torch.randn(1, 1, 256), [raw], [int(Q.Q4_K)], 256, None, None, 0.0, None, False)
    with pytest.raises(ValueError, match="GGML's types"):
        cpu.dequantize(raw, int(Q.Q2_K), 512, torch.float32)


def test_q4_0_quantizer_equals_the_gguf_package():
    """int4's quantizer makes the blocks llama.cpp's reference does, to the bit: signed largest magnitude, a zero
    block, ties of magnitude."""
    weights = torch.randn(33, 256)
    weights[0, :32] = 0.0
    weights[1, :32] = torch.tensor([1.0, -1.0] * 16)
    weights[2, 5] = 1e4
    expected = gguf.quants.quantize(weights.numpy(), Q.Q4_0)
    assert np.array_equal(blocks.quantize_q4_0(weights, rows=8).numpy(), expected)


# A Q4_K_M-like mix of every kept format, stacked layers of several formats (q/k/v, gate/up) among them.
MIX = {
    "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q6_K, "token_embd": Q.Q6_K, "output": Q.Q4_K,
}  # fmt: skip
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory, tokenizer_dir) -> dict[str, tuple]:
    """Per architecture: (the GGUF of the MIX, the checkpoint folder); every product's K a multiple of 256."""
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for arch in ("qwen3", "qwen2"):
        shape = SHAPE | ({"head_dim": 128} if arch == "qwen3" else {})
        directory = small_checkpoint(root, tokenizer_dir, arch, **shape)
        out[arch] = (write_gguf(root / f"{arch}-mix.gguf", directory, arch=arch, tokenizer=False, types=MIX), directory)
    return out


def dequantized_at_load(path, dtype, monkeypatch) -> torch.nn.Module:
    """The same file with every tensor dequantized at load (as on a GPU): the model the blocks must compute."""
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice of the formats dequantized
        patch.setattr(GGUFCheckpoint, "_block_layers", lambda self, model: {})
        return GGUFCheckpoint.open(path).load_model(torch.device("cpu"), dtype)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_a_mixed_file_computes_what_its_dequantized_weights_do(mixed_files, arch, monkeypatch):
    """float32: logits within float rounding of the dequantized model's; bf16: each product decodes its slice to bf16
    and multiplies, the dequantized bf16 model's own arithmetic, so the logits are the same bits."""
    path, _ = mixed_files[arch]
    model = GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.float32)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, BlockLinear) and [p.block_type for p in qkv.parts] == [int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)]
    assert isinstance(model.embed_tokens, BlockEmbedding) and isinstance(model.lm_head, BlockLinear)
    assert (qkv.bias is not None) == (arch == "qwen2")
    assert not any(p.dim() == 2 for p in model.parameters())  # every matrix is blocks
    reference = dequantized_at_load(path, torch.float32, monkeypatch)
    got, expected = logits(model, IDS), logits(reference, IDS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    bf16 = GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.bfloat16)
    assert torch.equal(logits(bf16, IDS), logits(dequantized_at_load(path, torch.bfloat16, monkeypatch), IDS))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_decoding_a_mixed_file_through_the_engine(mixed_files, arch, monkeypatch, tokenizer_dir):
    """Several requests decoded with the block kernels (prefill through the decoded slices) give the tokens of the
    dequantized model through the same engine, and logprobs within float rounding."""
    path, directory = mixed_files[arch]
    tokenizer = qwen3gen.Tokenizer.from_dir(directory)
    ours = qwen3gen.LLM(GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.float32), tokenizer)
    theirs = qwen3gen.LLM(dequantized_at_load(path, torch.float32, monkeypatch), tokenizer)
    assert ours.engine.backend.kernels is cpu
    prompts = [[5, 17, 999, 3], list(range(40, 140)), [7] * 9]
    params = qwen3gen.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, logprobs=2)
    for mine, reference in zip(ours.generate(prompts, params=params), theirs.generate(prompts, params=params), strict=True):
        assert mine.token_ids == reference.token_ids
        assert [lp[0] for lp in mine.logprobs] == [lp[0] for lp in reference.logprobs]
        np.testing.assert_allclose([lp[1] for lp in mine.logprobs], [lp[1] for lp in reference.logprobs], atol=1e-4)


def test_the_blocks_are_the_file_mapped_and_the_file_stays_as_it_was(mixed_files):
    """No copy of the blocks is made (the tensors are views of the file's mapping) and nothing is written to it, not
    by the load, the 2 MiB-page move of the dense rest, or generating."""
    path, directory = mixed_files["qwen3"]
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    checkpoint = GGUFCheckpoint.open(path)
    start = checkpoint.reader.data.ctypes.data
    model = checkpoint.load_model(torch.device("cpu"), torch.bfloat16)
    llm = qwen3gen.LLM(model, qwen3gen.Tokenizer.from_dir(directory))
    for module in model.modules():
        if isinstance(module, blocks.BlockMatrix):
            assert start <= module.blocks.data_ptr() < start + path.stat().st_size
    llm.generate([[1, 2, 3]], params=qwen3gen.SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    del llm, model, checkpoint
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_format_not_kept_is_dequantized_with_a_notice(tmp_path, tokenizer_dir):
    """Q4_1 (not a kept format): its layers are dense, and the load says so once."""
    directory = small_checkpoint(tmp_path, tokenizer_dir, "qwen3")
    path = write_gguf(tmp_path / "q41.gguf", directory, Q.Q8_0, tokenizer=False, types={"ffn_up": Q.Q4_1})
    with pytest.warns(UserWarning, match=r"its Q4_1 tensors are dequantized to float32 at load, with the layers they are part of; .* Q8_0, Q4_0"):
        model = GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.float32)
    assert isinstance(model.layers[0].mlp.gate_up_proj, torch.nn.Linear)  # gate Q8_0 beside up Q4_1: dense
    assert isinstance(model.layers[0].mlp.down_proj, BlockLinear)


def assert_round_trip(int4, bf16, ids, quantizer, block_type) -> None:
    """int4's logits are the bf16 model's with each matrix (and the tied head, as a matrix of its own) put through the
    quantizer and back (bf16 is changed)."""
    round_trip = lambda w: blocks.dequantize(quantizer(w), block_type, w.shape[1], torch.bfloat16)  # noqa: E731
    same = bf16.model
    with torch.inference_mode():
        for module in [m for m in same.modules() if isinstance(m, torch.nn.Linear)]:
            module.weight.copy_(round_trip(module.weight))
        same.lm_head = torch.nn.Linear(*same.embed_tokens.weight.shape[::-1], bias=False, dtype=torch.bfloat16)
        same.lm_head.weight.copy_(round_trip(same.embed_tokens.weight))
        assert torch.equal(int4.model(ids), same(ids))


def test_int4_quality_and_its_kernels(tiny_checkpoint):
    """int4 of rows of 64 (Q4_0 blocks of every linear layer and a copy of the tied head): greedy agreement and KL to
    bf16 beside int8's (printed), and through the engine, the kernels' tokens equal the PyTorch lines' (float32 activations)."""
    bf16 = qwen3gen.load(tiny_checkpoint, device="cpu", dtype="bfloat16")
    int4 = qwen3gen.load(tiny_checkpoint, device="cpu", quantization="int4")
    int8 = qwen3gen.load(tiny_checkpoint, device="cpu", quantization="int8")
    assert isinstance(int4.model.lm_head, BlockLinear) and int4.model.lm_head.parts[0].block_type == int(Q.Q4_0)
    assert int4.model.embed_tokens.weight.dtype == torch.bfloat16  # the lookup stays exact
    prompt = bf16.tokenizer.encode("Explain large language models.")
    ids = torch.tensor([prompt + bf16.generate(prompt, max_new_tokens=48, temperature=0.0, ignore_eos=True).token_ids])
    with torch.inference_mode():
        reference = bf16.model(ids)
        int4_agree, int4_kl = agreement_and_kl(reference, int4.model(ids))
        int8_agree, int8_kl = agreement_and_kl(reference, int8.model(ids))
    print(f"int4 vs bf16: greedy agreement {int4_agree:.0%}, mean KL {int4_kl:.1e} nats (int8: {int8_agree:.0%}, {int8_kl:.1e})")
    # Q4_0 of random (Gaussian, outlier-free) weights errs by about 9% of each matrix's norm (int8 per channel by
    # about 1%): on this 2-layer model that is a KL near 1 nat. A guard against regressions, not a quality claim.
    assert int4_agree >= 0.25 and int4_kl < 2.0 and int4_kl > int8_kl
    # Exactly what the bf16 model computes with each matrix put through Q4_0 and back: nothing else is lost.
    assert_round_trip(int4, bf16, ids, blocks.quantize_q4_0, int(Q.Q4_0))
    kernels, lines = (
        qwen3gen.load(tiny_checkpoint, device="cpu", dtype="float32", quantization="int4", kernels=use) for use in (True, False)
    )
    assert kernels.engine.backend.kernels is cpu and lines.engine.backend.kernels is None
    for text in ("Explain large language models.", "Hi"):
        expected = lines.generate(text, max_new_tokens=16, temperature=0.0, ignore_eos=True).token_ids
        assert kernels.generate(text, max_new_tokens=16, temperature=0.0, ignore_eos=True).token_ids == expected


def test_q4_k_quantizer_blocks_decode_within_half_a_step():
    """int4's Q4_K blocks: the gguf package decodes them as the PyTorch lines do (the layout is llama.cpp's), and each
    weight comes back within half a step of its sub-block (a fifteenth of its range, rounded up in 6 bits of its
    superblock's d), or its minimum's rounding where the range is clipped; zeros and a constant block too."""
    weights = torch.randn(9, 512) * torch.rand(9, 1) * 3
    weights[0, :256] = 0.0
    weights[1, :32] = 0.25
    raw = blocks.quantize_q4_k(weights, rows=4)
    decoded = blocks.reference_dequantize(raw.reshape(-1, 144), int(Q.Q4_K)).reshape(9, 512)
    assert torch.equal(decoded, torch.from_numpy(gguf.quants.dequantize(raw.numpy(), Q.Q4_K)))
    halves = raw.reshape(9, 2, 144)[..., :4].contiguous().view(torch.float16).float()  # d, dmin of each superblock
    sub = weights.reshape(9, 2, 8, 32)
    spread = sub.amax(-1).clamp(min=0) - sub.amin(-1).clamp(max=0)
    bound = spread[..., None] / 30 + halves[..., None, :1] / 2 + halves[..., None, 1:] + 1e-6
    assert ((decoded - weights).abs().reshape(9, 2, 8, 32) <= bound).all()
    assert torch.equal(decoded[0, :256], torch.zeros(256))
    with pytest.raises(ValueError, match="multiple of 256"):
        blocks.quantize_q4_k(torch.randn(2, 96))


def test_int4_of_rows_of_256s_is_q4_k(tmp_path, tokenizer_dir):
    """A model whose matrices all have rows of 256s quantizes every one to Q4_K (the tied head's copy too): exactly
    the bf16 model with each matrix put through Q4_K and back; quality beside int8's printed and guarded."""
    directory = small_checkpoint(tmp_path, tokenizer_dir, "qwen3", **SHAPE, head_dim=128)
    bf16 = qwen3gen.load(directory, device="cpu", dtype="bfloat16")
    int4 = qwen3gen.load(directory, device="cpu", quantization="int4")
    int8 = qwen3gen.load(directory, device="cpu", quantization="int8")
    layers = [m for m in int4.model.modules() if isinstance(m, BlockLinear)]
    assert len(layers) == 1 + 4 * len(int4.model.layers) and {m.parts[0].block_type for m in layers} == {int(Q.Q4_K)}
    ids = torch.tensor([list(range(3, 60))])
    with torch.inference_mode():
        reference = bf16.model(ids)
        int4_agree, int4_kl = agreement_and_kl(reference, int4.model(ids))
        int8_agree, int8_kl = agreement_and_kl(reference, int8.model(ids))
    print(f"int4 (Q4_K) vs bf16: greedy agreement {int4_agree:.0%}, mean KL {int4_kl:.1e} nats (int8: {int8_agree:.0%}, {int8_kl:.1e})")
    assert int4_agree >= 0.25 and int8_kl < int4_kl < 3.0
    assert_round_trip(int4, bf16, ids, blocks.quantize_q4_k, int(Q.Q4_K))


def test_int4_is_refused_off_the_cpu():
    with pytest.raises(qwen3gen.InvalidParameterError, match="int4 runs on the CPU only"):
        check_quantization("int4", torch.device("cuda"))
