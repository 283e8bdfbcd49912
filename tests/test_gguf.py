"""GGUF files: written here with the gguf package's GGUFWriter the way llama.cpp's converter writes them (its
tensor-name map, its metadata keys, its vocabulary layout), from random-weight checkpoints saved by transformers.

Checked against the same weights loaded from safetensors, and against transformers' own GGUF loading.
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from checkpoints import hf_model, hf_qwen2_model, write_checkpoint
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

import qwen3gen
import qwen3gen.loaders.gguf
from qwen3gen import cli
from qwen3gen.loaders.checkpoint import Checkpoint, load_model
from qwen3gen.loaders.blocks import BlockEmbedding, BlockLinear
from qwen3gen.loaders.gguf import GGUFCheckpoint, dequantize_into, write_tokenizer

FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
TEXTS = [
    "Hello, world! It's 2025 and we're testing GGUF's tokenizer.",
    "def f(x):\n    return x ** 2  # squares\n\n\tif x != None:\n        pass   \n",
    "你好，世界！日本語のテキストも。한국어도 있습니다.",
    "emoji 🙂🚀👩‍👩‍👧 and accents: café, naïve, Ünïcödé; NFC: e\u0301",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n391<|im_end|><|endoftext|>",
    "numbers 1234567890 3.14159 and   many    spaces\r\n\r\n  trailing ",
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
]


def random_blocks(qtype: Q, rows: int, k: int, seed: int) -> np.ndarray:
    """Rows of random blocks of a format the gguf package cannot write (the K types), with finite float16 scales
    (small, so that a model of them stays finite): [rows, bytes]."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    for at in {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}.get(qtype, (0,)):
        scale = rng.uniform(0.5, 1.5, size=(rows, k // block, 1)) * (0.002 if qtype == Q.Q6_K else 0.02)
        raw[..., at : at + 2] = scale.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(
    path: Path, checkpoint: Path, qtype: Q = Q.F32, arch: str = "qwen3", tokenizer: bool = True, sampling: dict | None = None,
    types: dict[str, Q] | None = None,
) -> Path:  # fmt: skip
    """A checkpoint folder -> one .gguf file, converted as convert_hf_to_gguf.py does for Qwen2/Qwen3 (no q/k
    permutation); 2-D tensors in `qtype` (or types' first whose key is part of the tensor's GGUF name), 1-D ones (norms,
    biases) kept in F32. A type the gguf package cannot write gets random blocks (random_blocks) instead of the weight."""
    config = json.loads((checkpoint / "config.json").read_text())
    arch_enum = gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.QWEN3  # any other arch: Qwen3's names
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base((config.get("rope_parameters") or config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):  # written only when config.json has it (Qwen3 does, Qwen2 does not)
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(FILE_TYPES.get(qtype, gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(config["vocab_size"])  # transformers takes it from here when there is no vocabulary
    if tokenizer:
        write_tokenizer(writer, checkpoint, config["vocab_size"])
    for key, value in (sampling or {}).items():  # what newer converters copy from generation_config.json
        getattr(writer, f"add_sampling_{key}")(value)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            data = f.get_tensor(name).float().numpy()
            new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            assert new_name is not None, name
            kind = next((t for key, t in (types or {}).items() if key in new_name), qtype)
            if data.ndim == 1 or kind == Q.F32:
                writer.add_tensor(new_name, data)
            elif kind == Q.F16:
                writer.add_tensor(new_name, gguf.quants.quantize(data, Q.F16))
            elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
                writer.add_tensor(new_name, random_blocks(kind, *data.shape, seed=len(new_name)), raw_dtype=kind)
            else:
                writer.add_tensor(new_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SMALL_VOCAB = 1024  # the weight tests need no tokenizer: a small vocabulary keeps them fast


def small_checkpoint(root: Path, tokenizer_dir: Path, arch: str, **overrides: object) -> Path:
    """qwen3: tied head, head_dim 32 != hidden/heads; qwen2: untied head (output.weight), like Qwen2.5-7B."""
    if arch == "qwen3":
        model = hf_model(seed=1, vocab_size=SMALL_VOCAB, **overrides)
    else:
        model = hf_qwen2_model(seed=2, vocab_size=SMALL_VOCAB, tie_word_embeddings=False, **overrides)
    name = "-".join([arch, *(f"{k}{v}" for k, v in overrides.items())])
    return write_checkpoint(root / name, tokenizer_dir, model)


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small")
    return {arch: small_checkpoint(root, tokenizer_dir, arch) for arch in ("qwen3", "qwen2")}


@pytest.fixture(scope="module")
def qwen3_f32(tiny_checkpoint, tmp_path_factory) -> Path:
    """The real vocabulary and tokenizer metadata: for the end-to-end tests."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "qwen3-f32.gguf", tiny_checkpoint)


@pytest.fixture(scope="module")
def gguf_llm(qwen3_f32):
    return qwen3gen.load(qwen3_f32, device="cpu", dtype="float32")


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def round_through(model: torch.nn.Module, qtype: Q) -> torch.nn.Module:
    """The model with every 2-D weight put through the GGUF type and back (what the file holds)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    return model


def safetensors_model(directory: Path) -> torch.nn.Module:
    return load_model(Checkpoint.open(directory), torch.device("cpu"), torch.float32)


IDS = torch.tensor([[5, 17, 999, 3, 256, 511, 42, 42, 7, 1000, 128, 64]])


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0])
def test_logits_equal_the_same_weights_from_safetensors(small_dirs, arch, qtype):
    """Also what shows the q/k rows are not permuted: un-permuting them (as for LLaMA) changes every logit."""
    directory = small_dirs[arch]
    path = write_gguf(directory.parent / f"{arch}-{qtype.name}.gguf", directory, qtype, arch=arch, tokenizer=False)
    checkpoint = GGUFCheckpoint.open(path)
    reference = safetensors_model(directory)
    assert checkpoint.config == reference.config.replace(torch_dtype=checkpoint.config.torch_dtype)
    model = checkpoint.load_model(torch.device("cpu"), torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    got, exact = logits(model, IDS), logits(reference, IDS)
    # Against the weights the file really holds: equal up to float32 rounding, whatever the type.
    torch.testing.assert_close(got, logits(round_through(reference, qtype), IDS), rtol=1e-5, atol=1e-4)
    if qtype == Q.F32:
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    elif qtype in (Q.F16, Q.BF16):
        torch.testing.assert_close(got, exact, rtol=0, atol=0.05 * exact.abs().max().item())
    else:  # the quantization changes the logits (so the comparison above is not trivially met)
        assert not torch.allclose(got, exact, rtol=1e-3, atol=1e-3)


def test_loads_in_bfloat16(small_dirs):
    """Q8_0 blocks kept as they are: each product decodes them to bf16 and multiplies, which is what the model of the
    same weights rounded to bf16 at load computes, to the bit."""
    directory = small_dirs["qwen2"]
    path = write_gguf(directory.parent / "qwen2-bf16-target.gguf", directory, Q.Q8_0, arch="qwen2", tokenizer=False)
    model = GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.bfloat16)
    reference = round_through(safetensors_model(directory), Q.Q8_0).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert isinstance(model.layers[0].self_attn.qkv_proj, BlockLinear) and isinstance(model.embed_tokens, BlockEmbedding)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16])
def test_logits_equal_transformers_gguf_loading(small_dirs, tokenizer_dir, arch, qtype):
    """transformers dequantizes GGUF itself and un-permutes q/k for llama only, not for qwen2/qwen3. Its qwen3 reader
    ignores key_length and takes head_dim 128 (what every real Qwen3 has), so the qwen3 model here has head_dim 128."""
    directory = small_dirs[arch]
    if arch == "qwen3":
        directory = small_checkpoint(directory.parent, tokenizer_dir, "qwen3", head_dim=128)
    path = write_gguf(directory.parent / f"tf-{arch}-{qtype.name}.gguf", directory, qtype, arch=arch, tokenizer=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = GGUFCheckpoint.open(path).load_model(torch.device("cpu"), torch.float32)
    assert theirs.config.model_type == arch
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), rtol=1e-5, atol=1e-4)


def test_full_vocabulary_file_loads_like_safetensors(gguf_llm, tiny_llm):
    assert gguf_llm.model.config == tiny_llm.model.config.replace(torch_dtype="float32")
    ids = torch.tensor([tiny_llm.tokenizer.encode("The quick brown fox: 你好 🙂 <think> x = 17 * 23")])
    torch.testing.assert_close(logits(gguf_llm.model, ids), logits(tiny_llm.model, ids), rtol=1e-5, atol=1e-5)


def test_tokenizer_from_gguf_metadata_encodes_like_tokenizer_json(gguf_llm, tokenizer_dir):
    ours = gguf_llm.tokenizer
    real = qwen3gen.Tokenizer.from_dir(tokenizer_dir)
    assert ours.vocab_size == real.vocab_size == 151669
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == real.encode(text), text
        assert ours.decode(ids) == real.decode(ids)
    everything = list(range(0, 151669, 97)) + list(range(151643, 151669))
    assert ours.decode(everything) == real.decode(everything)
    assert ours.eos_token_id == real.eos_token_id == 151645 and ours.pad_token_id == real.pad_token_id == 151643
    assert ours.token_to_id("<think>") == 151667
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 * 23?"}]
    for thinking in (True, False):
        expected = real.apply_chat_template(messages, enable_thinking=thinking)
        assert ours.apply_chat_template(messages, enable_thinking=thinking) == expected


def test_tokenizer_json_beside_the_file_is_preferred(gguf_llm, qwen3_f32, tmp_path, tokenizer_dir):
    path = tmp_path / "model.gguf"
    shutil.copy(qwen3_f32, path)
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    beside = GGUFCheckpoint.open(path).tokenizer()
    # tokenizer.json leaves <|fim_prefix|> non-special; llama.cpp's converter types it CONTROL (it looks special).
    fim = 151659
    assert beside._backend.get_added_tokens_decoder()[fim].special is False
    assert gguf_llm.tokenizer._backend.get_added_tokens_decoder()[fim].special is True
    assert beside.encode(TEXTS[4]) == gguf_llm.tokenizer.encode(TEXTS[4])
    assert beside.eos_token_id == 151645


def test_generate_from_a_gguf_path_matches_safetensors(gguf_llm, tiny_llm, qwen3_f32, capsys):
    assert gguf_llm.eos_token_ids == {151643, 151645}  # the GGUF's eos, and <|endoftext|> as llama.cpp does
    prompt = "Explain large language models."
    out = gguf_llm.generate(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert out.token_ids == tiny_llm.generate(prompt, max_new_tokens=12, temperature=0.0, ignore_eos=True).token_ids
    reply = gguf_llm.chat([{"role": "user", "content": "Hi"}], enable_thinking=False, max_new_tokens=4)
    assert reply.generation.stats.new_tokens <= 4
    argv = ["generate", "Hello", "--model", str(qwen3_f32), "--max-new-tokens", "6", "--temperature", "0",
            "--device", "cpu", "--dtype", "float32", "--json"]
    assert cli.main(argv) == 0
    expected = gguf_llm.generate("Hello", max_new_tokens=6, temperature=0.0).token_ids
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


def test_unsupported_architecture_is_refused(small_dirs, tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", small_dirs["qwen3"], arch="llama", tokenizer=False)
    with pytest.raises(qwen3gen.CheckpointError, match=r"holds a 'llama' model; only these GGUF architectures are supported: qwen3, qwen2\."):
        qwen3gen.load(path, device="cpu")


def test_unsupported_tensor_type_is_refused(tmp_path):
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_block_count(2)
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((8, 64 // block_size * type_size), dtype=np.uint8), raw_dtype=Q.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(qwen3gen.CheckpointError, match=r"stores tensor token_embd\.weight as Q8_1, which the gguf package cannot dequantize\."):
        qwen3gen.load(path, device="cpu")


def test_missing_file_missing_tensor_and_missing_tokenizer(small_dirs, tmp_path):
    with pytest.raises(qwen3gen.ModelNotFoundError, match="there is no GGUF file at"):
        qwen3gen.load(tmp_path / "nothing.gguf")
    path = write_gguf(tmp_path / "f32.gguf", small_dirs["qwen3"], tokenizer=False)
    with pytest.raises(qwen3gen.CheckpointError, match=r"f32\.gguf has no tokenizer\.ggml\.tokens metadata\."):
        qwen3gen.load(path, device="cpu")
    checkpoint = GGUFCheckpoint.open(path)
    del checkpoint.tensors["blk.1.attn_k_norm.weight"]
    with pytest.raises(qwen3gen.CheckpointError, match=r"has no tensor blk\.1\.attn_k_norm\.weight"):
        checkpoint.load_model(torch.device("cpu"), torch.float32)


def test_sampling_defaults_from_general_sampling_metadata(small_dirs, tmp_path):
    path = write_gguf(tmp_path / "s.gguf", small_dirs["qwen3"], tokenizer=False, sampling={"temp": 0.6, "top_k": 20, "top_p": 0.95})
    config = GGUFCheckpoint.open(path).generation_config
    assert {k: config[k] for k in ("do_sample", "temperature", "top_k", "top_p")} == {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert "do_sample" not in GGUFCheckpoint.open(write_gguf(tmp_path / "g.gguf", small_dirs["qwen3"], tokenizer=False)).generation_config


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS])
def test_k_and_i_quants_expand_in_row_slices(tmp_path, monkeypatch, qtype):
    """Types the gguf package reads but cannot write: random blocks (finite f16 scales), expanded in 2 slices."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 0x3C, size=(6, 2 * size), dtype=np.uint8)
    writer = gguf.GGUFWriter(tmp_path / "k.gguf", "qwen3")
    writer.add_tensor("t", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "k.gguf").tensors[0]
    assert [int(d) for d in tensor.shape] == [2 * block, 6]
    monkeypatch.setattr(qwen3gen.loaders.gguf, "_ROW_CHUNK_ELEMENTS", 4 * 2 * block)  # 4 rows at a time
    out = torch.empty(6, 2 * block, dtype=torch.bfloat16)
    dequantize_into(tensor, out)
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype))
    assert expected.isfinite().all() and expected.abs().max() > 0
    assert torch.equal(out, expected.to(torch.bfloat16))
