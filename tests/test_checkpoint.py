"""Checkpoints: layouts that load (against transformers), bf16 loading without a second copy, refusals by name,
and finding models (local folder, alias, repo id) through huggingface_hub, its real cache logic included."""

import fnmatch
import hashlib
import io
import json
import os
import pickle
import re
import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from checkpoints import hf_model, write_checkpoint
from huggingface_hub import errors as hub_errors
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qwen3gen
from qwen3gen.loaders.checkpoint import Checkpoint, download, load_model, parse_dtype, resolve
from qwen3gen.errors import CheckpointError, InvalidParameterError, ModelNotFoundError

try:  # huggingface_hub 2.x builds its HTTP errors on httpx2's Response
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

VOCAB = 1000  # small checkpoints: the refusals and layouts do not need the real vocabulary
CPU = torch.device("cpu")


def small_hf(seed: int = 0, **overrides):
    return hf_model(seed=seed, vocab_size=VOCAB, **overrides)


def load(directory: Path, dtype: torch.dtype = torch.float32) -> qwen3gen.Qwen3:
    return load_model(Checkpoint.open(directory), CPU, dtype)


def assert_same_logits(model, hf) -> None:
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def small_checkpoint(tmp_path, tokenizer_dir) -> Path:
    return write_checkpoint(tmp_path / "ckpt", tokenizer_dir, small_hf())


def sharded(tmp_path, tokenizer_dir, hf) -> Path:
    directory = write_checkpoint(tmp_path / "sharded", tokenizer_dir, hf, max_shard_size="100KB")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 3
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    return directory


# --- 1. layouts load and match transformers -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_config_layouts_match_transformers(tmp_path, tokenizer_dir, layout):
    # An unusual rope_theta: reading it from the wrong field (or falling back to a default) changes the logits.
    hf = small_hf(seed=3, rope_theta=1234.0)
    directory = write_checkpoint(tmp_path, tokenizer_dir, hf, layout=layout)
    config = json.loads((directory / "config.json").read_text())
    if layout == "v5":
        assert config["rope_parameters"]["rope_theta"] == 1234.0 and config["dtype"] == "float32"
        assert "rope_theta" not in config and "torch_dtype" not in config
    else:
        assert config["rope_theta"] == 1234.0 and config["torch_dtype"] == "float32"
        assert "rope_parameters" not in config and "dtype" not in config
    checkpoint = Checkpoint.open(directory)
    assert checkpoint.config.rope_theta == 1234.0 and checkpoint.config.torch_dtype == "float32"
    assert_same_logits(load(directory), hf)


def test_sharded_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    hf = small_hf(seed=4)
    directory = sharded(tmp_path, tokenizer_dir, hf)
    checkpoint = Checkpoint.open(directory)
    assert len(set(checkpoint.tensor_files.values())) >= 3
    assert_same_logits(load_model(checkpoint, CPU, torch.float32), hf)


def test_tied_checkpoint_with_a_saved_lm_head_loads(tmp_path, tokenizer_dir):
    hf = small_hf(seed=5)
    directory = write_checkpoint(tmp_path, tokenizer_dir, hf)
    # Some exporters save the tied head too; a different value shows the embedding is the one used.
    edit_tensors(directory / "model.safetensors", lambda t: t.update({"lm_head.weight": torch.randn(VOCAB, 64)}))
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" in handle.keys()
    model = load(directory)
    assert model.lm_head is None and model.config.tie_word_embeddings
    assert_same_logits(model, hf)


def test_untied_checkpoint_loads_its_own_head(tmp_path, tokenizer_dir):
    hf = small_hf(seed=6, tie_word_embeddings=False)
    model = load(write_checkpoint(tmp_path, tokenizer_dir, hf))
    assert model.lm_head is not None
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert_same_logits(model, hf)


# --- 2. bfloat16, and no second copy -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bfloat16", "bf16"])
def test_bfloat16_loading(small_checkpoint, name):
    hf = small_hf()  # the model small_checkpoint saved (float32)
    llm = qwen3gen.load(small_checkpoint, device="cpu", dtype=name)
    params = dict(llm.model.checkpoint_tensors())
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    reference = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    for name_, p in params.items():
        assert torch.equal(p, reference[name_].to(torch.bfloat16)), name_


def test_model_is_built_on_meta_and_each_parameter_copied_once_while_streaming(small_checkpoint, monkeypatch):
    import qwen3gen.loaders.checkpoint as ckpt

    built = []

    class SpyQwen3(ckpt.Qwen3):
        def __init__(self, cfg):
            super().__init__(cfg)
            built.append({p.device.type for p in self.parameters()})

    yielded = [0]
    original_tensors = Checkpoint.tensors

    def counting_tensors(self, names, parts=None):
        for item in original_tensors(self, names, parts):
            yielded[0] += 1
            yield item

    # (destination storage, its address, source dtype, tensors read from the checkpoint so far), real storage
    # only; holding the storage keeps its memory from being freed and reused, so an address match below is
    # the same memory.
    copies = []
    original_copy = torch.Tensor.copy_

    def spy_copy(self, src, *args, **kwargs):
        if self.device.type != "meta":  # meta init (torch's decompositions use copy_) allocates nothing
            copies.append((self.untyped_storage(), self.data_ptr(), src.dtype, yielded[0]))
        return original_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(ckpt, "Qwen3", SpyQwen3)
    monkeypatch.setattr(Checkpoint, "tensors", counting_tensors)
    monkeypatch.setattr(torch.Tensor, "copy_", spy_copy)
    model = load(small_checkpoint, torch.bfloat16)
    monkeypatch.undo()

    assert built == [{"meta"}], "the model must be built on the meta device, with no storage to initialise"
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    # Every checkpoint tensor was copied exactly once, straight from the float32 file into its place in the bf16
    # parameters (q/k/v and gate/up: a row block of one matrix): no float32 model converted afterwards, no
    # parameter written twice.
    targets = [t for _, t in model.checkpoint_tensors()]
    assert len(targets) > len(list(model.parameters())) and len(copies) == len(targets)
    for t in targets:
        assert sum(address == t.data_ptr() for _, address, _, _ in copies) == 1
    assert all(src == torch.float32 for _, _, src, _ in copies)
    # Streaming: the k-th copy happens when exactly k tensors have been read (no state dict read up front).
    assert [seen for _, _, _, seen in copies] == list(range(1, len(targets) + 1))


# --- 3. refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tied", "name"), [(True, "model.layers.1.self_attn.k_norm.weight"), (False, "lm_head.weight")]
)
def test_missing_tensor_is_named(tmp_path, tokenizer_dir, tied, name):
    directory = write_checkpoint(tmp_path, tokenizer_dir, small_hf(tie_word_embeddings=tied))
    edit_tensors(directory / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load(directory)


def test_extra_tensor_is_named(small_checkpoint):
    name = "model.layers.2.mlp.up_proj.weight"  # a third layer that config.json does not have
    edit_tensors(small_checkpoint / "model.safetensors", lambda t: t.update({name: torch.zeros(128, 64)}))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load(small_checkpoint)


def test_misshaped_tensor_is_named_with_both_shapes(small_checkpoint):
    name = "model.layers.0.self_attn.q_proj.weight"  # [128, 64] in the model
    edit_tensors(small_checkpoint / "model.safetensors", lambda t: t.update({name: t[name].T.contiguous()}))
    with pytest.raises(CheckpointError, match=re.escape(name)) as info:
        load(small_checkpoint)
    assert "[64, 128]" in str(info.value) and "[128, 64]" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "truncated shard"])
def test_corrupt_safetensors_is_refused(tmp_path, tokenizer_dir, damage):
    if damage == "truncated shard":
        directory = sharded(tmp_path, tokenizer_dir, small_hf())
        file = sorted(directory.glob("model-*.safetensors"))[1]
    else:
        directory = write_checkpoint(tmp_path, tokenizer_dir, small_hf())
        file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"garbage": os.urandom(len(data)), "empty": b""}.get(damage, data[:-100]))
    with pytest.raises(CheckpointError, match=re.escape(file.name)) as info:
        load(directory)
    assert "corrupt" in str(info.value)


def test_missing_shard_is_named(tmp_path, tokenizer_dir):
    directory = sharded(tmp_path, tokenizer_dir, small_hf())
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        Checkpoint.open(directory)


def message(info: pytest.ExceptionInfo, directory: Path) -> str:
    """The error message without the checkpoint's path (tmp_path holds the test's name)."""
    return str(info.value).replace(str(directory), "<dir>")


def test_no_config_json(small_checkpoint):
    (small_checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError) as info:
        qwen3gen.load(small_checkpoint, device="cpu")
    assert message(info, small_checkpoint) == "<dir> has no config.json, so it is not a Hugging Face checkpoint."


def test_config_json_not_json(small_checkpoint):
    (small_checkpoint / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(small_checkpoint)
    assert message(info, small_checkpoint).startswith("<dir>/config.json is not valid JSON (")


def test_unsupported_model_type(small_checkpoint):
    edit_config(small_checkpoint, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        Checkpoint.open(small_checkpoint)


@pytest.mark.parametrize(
    ("layout", "field", "value", "kind"),
    [
        ("v5", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 512}, "yarn"),
        ("v4", "rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),
        ("v4", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ],
)
def test_rope_scaling_is_refused(tmp_path, tokenizer_dir, layout, field, value, kind):
    directory = write_checkpoint(tmp_path, tokenizer_dir, small_hf(), layout=layout)
    Checkpoint.open(directory)  # loads before the edit
    edit_config(directory, **{field: value})
    with pytest.raises(CheckpointError, match=f"RoPE scaling of type '{kind}' is not supported"):
        Checkpoint.open(directory)


class _Trap:
    """Unpickling this creates the sentinel file: proof that pickled weights were executed."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickled_weights_are_refused_without_unpickling(small_checkpoint, monkeypatch):
    sentinel = small_checkpoint.parent / "unpickled"
    (small_checkpoint / "model.safetensors").unlink()
    (small_checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append("torch.load"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("pickle.load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("pickle.loads"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        qwen3gen.load(small_checkpoint, device="cpu")
    text = message(info, small_checkpoint)
    assert "pickle" in text and "safetensors" in text
    assert calls == [] and not sentinel.exists()


@pytest.mark.parametrize("bad", ["float64", "int8", "bfloat", "Tensor", "", 16])
def test_invalid_dtype(small_checkpoint, bad):
    with pytest.raises(InvalidParameterError, match=re.escape(repr(bad))):
        parse_dtype(bad)
    with pytest.raises(InvalidParameterError):
        qwen3gen.load(small_checkpoint, device="cpu", dtype=bad)


def test_dtype_aliases():
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("fp16") is parse_dtype("half") is torch.float16
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16


# --- 4. resolve() and download() with snapshot_download patched ---------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Replaces huggingface_hub.snapshot_download; records its calls. Set hub.result or hub.error."""

    class Hub:
        calls: list = []
        result: Path = tmp_path / "snapshot"
        error: Exception | None = None

    def fake(repo_id, **kwargs):
        Hub.calls.append((repo_id, kwargs))
        if Hub.error is not None:
            raise Hub.error
        return str(Hub.result)

    Hub.calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)  # relative names are looked up here, not in the repository
    return Hub


def http_error(cls, status: int):
    request = httpx.Request("GET", "https://huggingface.co/api/models/Qwen/Qwen3-0.6B")
    return cls(f"{status} error", response=httpx.Response(status, request=request))


def test_local_folder_resolves_to_itself(small_checkpoint, hub):
    assert resolve(str(small_checkpoint)) == small_checkpoint
    assert hub.calls == []


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [("base", "Qwen/Qwen3-0.6B-Base"), ("reasoning", "Qwen/Qwen3-0.6B"), ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B")],
)
def test_aliases_and_repo_ids_go_to_the_hub(hub, name, repo_id):
    assert resolve(name) == hub.result
    assert download(name) == hub.result
    assert [call[0] for call in hub.calls] == [repo_id, repo_id]
    patterns = hub.calls[0][1]["allow_patterns"]
    wanted = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    for file in wanted:
        assert any(fnmatch.fnmatch(file, p) for p in patterns), file
    for file in ["pytorch_model.bin", "model.pt", "consolidated.pth"]:
        assert not any(fnmatch.fnmatch(file, p) for p in patterns), file


def test_load_alias_end_to_end(hub, tiny_checkpoint, tiny_hf):
    hub.result = tiny_checkpoint
    llm = qwen3gen.load("reasoning", device="cpu")
    assert [call[0] for call in hub.calls] == ["Qwen/Qwen3-0.6B"]
    assert llm.model.embed_tokens.weight.dtype == torch.float32  # the CPU default
    assert torch.equal(llm.model.embed_tokens.weight, tiny_hf.model.embed_tokens.weight)
    assert llm.default_sampling().temperature == 0.6  # its generation_config.json
    assert llm.generate("Hello", max_new_tokens=3, temperature=0.0).token_ids


@pytest.mark.parametrize("name", ["./nope", "/tmp/does/not/exist", "~/qwen3gen-no-such-folder", "nope", "a/b/c"])
def test_missing_path_is_not_sent_to_the_hub(hub, name):
    assert not Path(name).expanduser().exists()
    with pytest.raises(ModelNotFoundError, match=re.escape(name)):
        resolve(name)
    assert hub.calls == []


def test_file_path_is_refused(small_checkpoint, hub):
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve(str(small_checkpoint / "config.json"))
    assert hub.calls == []


@pytest.mark.parametrize("offline", [True, False])
def test_not_in_cache(hub, monkeypatch, offline):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.error = hub_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    with pytest.raises(ModelNotFoundError, match="Qwen/Qwen3-0.6B is not in the local Hugging Face cache") as info:
        resolve("reasoning")
    message = str(info.value)
    assert ("HF_HUB_OFFLINE is set" in message) == offline
    assert ("the Hub cannot be reached" in message) == (not offline)


def test_offline_mode_set_in_code_is_reported(hub, monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) at import: its own flag is what counts."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub.error = hub_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        resolve("base")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (http_error(hub_errors.RepositoryNotFoundError, 404), "there is no model Qwen/Qwen3-0.6B on the Hugging Face Hub"),
        (http_error(hub_errors.GatedRepoError, 403), "Qwen/Qwen3-0.6B is gated"),
        (http_error(hub_errors.HfHubHTTPError, 500), "downloading Qwen/Qwen3-0.6B failed: 500 error"),
        (OSError(), "downloading Qwen/Qwen3-0.6B failed: OSError"),  # an empty message
    ],
)
def test_hub_errors(hub, error, message):
    hub.error = error
    with pytest.raises(ModelNotFoundError, match=re.escape(message)):
        resolve("reasoning")


# --- 5. the real snapshot_download, network isolated ------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp_path, offline mode on, and any socket connection recorded and refused."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read these once, at import: its constants are what snapshot_download consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    connects = []

    def refuse(self, address):
        connects.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return cache, connects


def test_real_download_offline_with_empty_cache(offline_hub):
    cache, connects = offline_hub
    with pytest.raises(ModelNotFoundError) as info:
        download("Qwen/Qwen3-0.6B")
    assert str(info.value) == (
        "Qwen/Qwen3-0.6B is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "connect to the internet or pass a checkpoint folder."
    )
    assert connects == []
    assert not (cache / "models--Qwen--Qwen3-0.6B" / "snapshots").exists()


def test_real_download_refuses_repo_id_the_hub_rejects(offline_hub):
    with pytest.raises(ModelNotFoundError, match=re.escape("Qwen/bad--name is not a valid Hugging Face repo id")):
        resolve("Qwen/bad--name")


def test_real_download_offline_finds_the_cached_snapshot(offline_hub, tiny_checkpoint, tiny_hf):
    cache, connects = offline_hub
    repo = cache / "models--Qwen--Qwen3-0.6B"
    commit = hashlib.sha1(b"qwen3gen test snapshot").hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as the hub writes it
    for file in tiny_checkpoint.iterdir():  # the hub's layout: content-named blobs, symlinked from the snapshot
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))

    found = download("Qwen/Qwen3-0.6B")
    assert found.resolve() == snapshot.resolve()
    assert resolve("reasoning").resolve() == snapshot.resolve()
    llm = qwen3gen.load("reasoning", device="cpu")
    assert torch.equal(llm.model.embed_tokens.weight, tiny_hf.model.embed_tokens.weight)
    assert connects == []
    with pytest.raises(ModelNotFoundError, match="Qwen/Qwen3-0.6B-Base is not in the local Hugging Face cache"):
        resolve("base")  # a different repo is still not cached


def test_loading_shows_progress_on_a_terminal_only(tiny_checkpoint, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr("sys.stderr", stream)
        load_model(Checkpoint.open(tiny_checkpoint), torch.device("cpu"), torch.float32)
        assert ("loading " + tiny_checkpoint.name in stream.getvalue()) == shown
