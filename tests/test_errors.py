"""Errors a user can cause at load time: each one a Qwen3GenError subclass with one sentence saying what is wrong.

Damaged .gguf files (cut short, empty, not GGUF at all) and bad device, dtype, quantization and engine options.
The parameters are checked before anything is read: a bad one given with a model path that does not exist still
names the parameter, not the missing model.
"""

import os

import gguf
import pytest
import torch
from checkpoints import hf_model
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

import qwen3gen
from qwen3gen.loaders import checkpoint as ckpt
from qwen3gen.errors import CheckpointError, InvalidParameterError

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_small_gguf(path):
    """A complete, loadable qwen3 GGUF of a few hundred kB: a byte-level vocabulary (256 bytes, 2 merges, 3 specials)
    and a tiny model, written with the gguf package's GGUFWriter as llama.cpp's converter writes Qwen3."""
    merges = ["H e", "l l"]
    normal = sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    tokens = normal + SPECIAL
    types = [gguf.TokenType.NORMAL] * len(normal) + [gguf.TokenType.CONTROL] * len(SPECIAL)
    model = hf_model(seed=3, vocab_size=len(tokens))
    config = model.config
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding: llama.cpp writes no output.weight
            continue
        data = tensor.float().numpy()
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(new_name, data if data.ndim == 1 else gguf.quants.quantize(data, Q.F16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


@pytest.fixture(scope="module")
def small_llm(small_gguf):
    """Loaded with device "CPU" (accepted in any case) and a small KV pool (the default one takes seconds to zero)."""
    return qwen3gen.load(small_gguf, device="CPU", kv_memory="16MiB")


@pytest.fixture
def missing(tmp_path):
    """A model that does not exist: a parameter error raised with it was raised before the model was looked up."""
    return tmp_path / "no-such-model"


def test_the_small_gguf_loads_and_generates(small_llm):
    llm = small_llm
    assert llm.tokenizer.encode("Hello") == [256, 257, ord("o") - ord("!")]  # He, ll, o (the alphabet starts at "!")
    assert llm.generate("Hi", max_new_tokens=3, temperature=0.0, ignore_eos=True).stats.new_tokens == 3


# --- 1. damaged GGUF files ----------------------------------------------------------------------------------------


def cut_points(size):
    """1,000, 5,000 and 50,000 bytes where the file is longer, else fractions of it; then cuts in the tensor data."""
    fixed = [n for n in (1_000, 5_000, 50_000) if n < size]
    fractions = [int(size * f) for f in (0.01, 0.05, 0.25)][len(fixed) :]
    return [10, 100, *fixed, *fractions, size // 2, int(size * 0.99)]


def test_truncated_gguf_is_a_checkpoint_error(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    assert len(data) > 50_000  # the fixed cuts fall in the metadata, the tensor infos and the tensor data
    for cut in cut_points(len(data)):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"is truncated or corrupt") as info:
            qwen3gen.load(path, device="cpu")
        assert "download or convert it again" in str(info.value), cut


def test_truncated_gguf_names_its_size(small_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(small_gguf.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match=r"it is 50,000 bytes, but its contents run to byte [\d,]+"):
        qwen3gen.load(path, device="cpu")


def test_empty_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty\.gguf is empty \(0 bytes\)"):
        qwen3gen.load(path, device="cpu")


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(os.urandom(10_000))
    with pytest.raises(CheckpointError, match=r"random\.gguf is not a GGUF file \(it does not start with the bytes 'GGUF'\)"):
        qwen3gen.load(path, device="cpu")


def test_gguf_magic_then_garbage_is_corrupt(tmp_path):
    path = tmp_path / "garbage.gguf"
    header = b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (10**9).to_bytes(8, "little")
    path.write_bytes(header + os.urandom(4_000))  # a billion metadata entries said, garbage given
    with pytest.raises(CheckpointError, match=r"corrupt"):
        qwen3gen.load(path, device="cpu")


def test_unknown_gguf_version(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(CheckpointError, match=r"says it is GGUF version 9, but the gguf package reads only versions 2, 3"):
        qwen3gen.load(path, device="cpu")


# --- 2. devices -------------------------------------------------------------------------------------------------------


def test_cpu_is_accepted_in_any_case(small_llm):
    for name in ("CPU", "cpu", " Cpu ", "cpu:0", torch.device("cpu")):
        assert ckpt.parse_device(name) == torch.device("cpu")
    assert small_llm.device.type == "cpu"


def test_default_device():
    assert ckpt.parse_device(None) == ckpt.default_device()


@pytest.mark.parametrize("device", ["tpu", "", "gpu", "cuda:-1", "cuda:x"])
def test_unknown_device_name(missing, device):
    with pytest.raises(InvalidParameterError, match=rf"device {device!r} is not a device name such as 'cuda'.*available here: .*cpu"):
        qwen3gen.load(missing, device=device)


@pytest.mark.parametrize("device", ["xla", "hpu", torch.device("xla")])
def test_unsupported_device_type(missing, device):
    with pytest.raises(InvalidParameterError, match=r"device '(xla|hpu)' is not supported \(only cuda, mps, xpu, cpu\)"):
        qwen3gen.load(missing, device=device)


@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_meta_device_is_refused(missing, device):
    with pytest.raises(InvalidParameterError, match=r"device 'meta' holds no data, so a model cannot run on it"):
        qwen3gen.load(missing, device=device)


@pytest.mark.parametrize("device", ["cuda", "CUDA:0", "mps", "xpu", torch.device("cuda")])
def test_missing_accelerator(missing, device):
    kind = torch.device(str(device).lower()).type
    if ckpt._device_count(kind):
        pytest.skip(f"this machine has a {kind} device")
    with pytest.raises(InvalidParameterError, match=rf"device '{kind}(:0)?' is not available on this machine; available here: .*cpu"):
        qwen3gen.load(missing, device=device)


def test_accelerator_index_out_of_range(missing, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert ckpt.parse_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InvalidParameterError, match=r"device 'cuda:2' does not exist: this machine has 2 cuda devices \(cuda:0, cuda:1\)"):
        qwen3gen.load(missing, device="cuda:2")


@pytest.mark.parametrize("device", [0, 1.5, ["cpu"]])
def test_device_of_the_wrong_type(missing, device):
    with pytest.raises(InvalidParameterError, match=r"device must be a name such as 'cuda'.*or a torch.device, not "):
        qwen3gen.load(missing, device=device)


# --- 3. dtype ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "int4", 3, True])
def test_invalid_dtype(missing, dtype):
    with pytest.raises(InvalidParameterError, match=r"dtype must be one of float32, bfloat16, float16 \(or bf16, fp16, half, fp32, float\), not "):
        qwen3gen.load(missing, device="cpu", dtype=dtype)


def test_dtype_names_in_any_case():
    assert ckpt.parse_dtype("BF16") is ckpt.parse_dtype("torch.bfloat16") is torch.bfloat16
    assert ckpt.parse_dtype("Float32") is torch.float32 and ckpt.parse_dtype(torch.float16) is torch.float16


# --- 4, 5. quantization and engine options ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["int2", "INT8", "", "gptq"])
def test_unknown_quantization(missing, method):
    with pytest.raises(InvalidParameterError, match=rf"quantization must be one of int8, int4 \(or None\), not {method!r}"):
        qwen3gen.load(missing, device="cpu", quantization=method)


def test_int4_off_the_cpu_is_refused_before_anything_is_read(missing, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidParameterError, match="int4 runs on the CPU only"):
        qwen3gen.load(missing, device="cuda", quantization="int4")


@pytest.mark.parametrize(
    ("kv_memory", "message"),
    [("lots", r"kv_memory 'lots' is not a size such as '8GiB'"), (-5, r"kv_memory must be positive"), (2.5, r"kv_memory must be a number of bytes")],
)
def test_bad_kv_memory_is_refused_before_loading(missing, kv_memory, message):
    with pytest.raises(InvalidParameterError, match=message):
        qwen3gen.load(missing, device="cpu", kv_memory=kv_memory)


def test_unknown_engine_option(missing):
    with pytest.raises(InvalidParameterError, match=r"load\(\) has no option 'max_runing'; the engine options are kv_memory, block_size, max_running"):
        qwen3gen.load(missing, device="cpu", max_runing=4)


def test_engine_options_are_checked_by_the_engine(tiny_checkpoint):
    with pytest.raises(InvalidParameterError, match=r"max_running must be a positive integer, not -1"):
        qwen3gen.load(tiny_checkpoint, device="cpu", kv_memory="16MiB", max_running=-1)


def test_good_parameters_reach_the_model_lookup(missing):
    with pytest.raises(qwen3gen.ModelNotFoundError):
        qwen3gen.load(missing, device="CPU", dtype="BF16", quantization="int8", kv_memory="64MiB", max_running=2)
