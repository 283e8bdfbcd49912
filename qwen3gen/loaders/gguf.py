"""GGUF files (llama.cpp's format) of the `qwen3` and `qwen2` architectures: config, weights, tokenizer.

The file is read with the `gguf` package (llama.cpp's own reader). Every tensor type that package can
dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, the IQ types …) is expanded to the
target dtype a slice of rows at a time, straight into a model built on the meta device, as checkpoint.py does
for safetensors: there is never a second full copy, and never a float32 copy of a whole tensor.

llama.cpp's converter permutes the query/key rows only for LLaMA-style models (rotary pairs interleaved); the
Qwen2 and Qwen3 graphs use NeoX rotary (split halves, as transformers does), so their tensors are written as
transformers holds them and are loaded here unpermuted. GGUF lists dimensions fastest-varying first, the
reverse of torch's order.

The tokenizer is the `tokenizer.json` beside the file when there is one, else the one embedded as
`tokenizer.huggingface.json`, else rebuilt from the GGUF vocabulary (tokens, merges, token types) as Qwen's
byte-level BPE with its pre-tokenizer; special tokens, the chat template and the EOS come from the metadata.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Qwen3Config
from ..errors import CheckpointError, ModelNotFoundError
from ..model import STACKED, Qwen3
from ..tokenizer import Tokenizer
from . import blocks
from .checkpoint import allocate, load_progress, unallocated_model

SUPPORTED_ARCHITECTURES = ("qwen3", "qwen2")
# Pre-tokenizer names (tokenizer.ggml.pre) llama.cpp gives Qwen's split regex.
QWEN_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
DENSE = {"F32", "F16", "BF16"}  # GGML's types that only convert
_ROW_CHUNK_ELEMENTS = 1 << 22  # dequantize about 16 MB of float32 at a time
GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count

# Our parameter names (model.py, the transformers names without "model.") <- llama.cpp's tensor names.
_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_PARAM = re.compile(r"layers\.(\d+)\.(.+)")


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name, e.g. layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_PARAM.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"parameter {name} has no GGUF counterpart.")  # only if model.py gains a parameter
    return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading .gguf files needs the gguf package (pip install gguf).") from None
    return gguf


def _reader_class(gguf: Any) -> type:
    """gguf.GGUFReader, with the same fields and tensors, but about ten times faster on a Qwen file.

    The stock reader slices its numpy memmap item by item, through Python, for every element of every array: the
    300,000 strings of the vocabulary and merges and the 150,000 token types take it tens of seconds. Here the
    memory map is held as a plain ndarray view (no memmap bookkeeping per slice), and arrays of strings or scalars are
    decoded as they are met into `arrays` (lists, by field name; field() reads them there), their fields left
    without values. Arrays of arrays take the stock reader's walk.
    """
    types = gguf.GGUFValueType
    array, string = int(types.ARRAY), int(types.STRING)
    scalars = {int(t): np.dtype(n) for t, n in gguf.GGUFReader.gguf_scalar_to_np.items()}
    unpack_length = struct.Struct("<Q").unpack_from

    class Reader(gguf.GGUFReader):
        """Every read is bounds-checked: past the end of the file it raises _Truncated, where the stock reader
        would return a short array (and fail later with an IndexError or a reshape's ValueError, or not at all)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._decoded: dict[int, list] = {}  # arrays' values by the offset of the array
            super().__init__(*args, **kwargs)
            self.arrays: dict[str, list] = {}  # ... by the name of their field
            for name, found in self.fields.items():  # a field's parts start with its key's length, key and type
                start = found.offset + sum(int(part.nbytes) for part in found.parts[:3])
                if start in self._decoded:
                    self.arrays[name] = self._decoded.pop(start)

        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

        def _need(self, end: int) -> None:
            if end > len(self._plain):
                raise _Truncated(end)

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            self._need(int(offset) + np.dtype(dtype).itemsize * int(count))
            return super()._get(offset, dtype, count, override_order)

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
            data = self._plain
            if int(raw_type) != array or self.byte_order != "I" or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            self._need(orig_offs + 12)
            item_type = data[orig_offs : orig_offs + 4].view(np.uint32)
            length = data[orig_offs + 4 : orig_offs + 12].view(np.uint64)
            count, kind = int(length[0]), int(item_type[0])
            parts: list = [item_type, length]
            offs = orig_offs + 12
            if kind == string:  # decoded here in one pass, for field(); the field itself holds no values
                view, decoded = memoryview(data), []
                try:
                    for _ in range(count):
                        (size,) = unpack_length(data, offs)
                        decoded.append(str(view[offs + 8 : offs + 8 + size], "utf-8"))
                        offs += 8 + size
                except struct.error:  # a length past the end
                    raise _Truncated(offs + 8) from None
                self._need(offs)  # a string past the end was cut short: refused here
                self._decoded[orig_offs] = decoded
                return offs - orig_offs, parts, [], [types.ARRAY, types.STRING]
            elif kind in scalars:
                self._need(offs + count * scalars[kind].itemsize)
                values = data[offs : offs + count * scalars[kind].itemsize].view(scalars[kind])
                self._decoded[orig_offs] = values.tolist()
                return offs + values.nbytes - orig_offs, parts, [], [types.ARRAY, types(kind)]
            else:  # arrays of arrays: the stock reader's own walk
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, parts, indices, [types.ARRAY] + [types(kind)] * bool(count)

    return Reader


class _Truncated(Exception):
    """A read past the end of the file; `end` is the byte the read needed the file to reach."""

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


def _check_start(path: Path, supported_versions: tuple[int, ...]) -> None:
    """Refuse an empty file, a file too short for a GGUF header, one that does not start with the GGUF magic,
    or one of a version the gguf package cannot read."""
    try:
        with path.open("rb") as file:
            start = file.read(_HEADER_BYTES)
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}).") from None
    if not start:
        raise CheckpointError(f"{path} is empty (0 bytes); download or convert the model again.")
    if not start.startswith(GGUF_MAGIC[: len(start)]):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a .gguf model file.")
    if len(start) < _HEADER_BYTES:
        raise CheckpointError(
            f"{path} is truncated or corrupt: it is {len(start)} bytes, shorter than a GGUF header; download or convert it again."
        )
    version = int.from_bytes(start[4:8], "little")
    if version & 0xFFFF == 0:  # written big-endian: the reader swaps it
        version = int.from_bytes(start[4:8], "big")
    if version not in supported_versions:
        raise CheckpointError(
            f"{path} says it is GGUF version {version}, but the gguf package reads only versions "
            f"{', '.join(map(str, supported_versions))}, so the file is corrupt or newer than that package (upgrade gguf)."
        )


@dataclass
class GGUFCheckpoint:
    """A .gguf file: its config, generation defaults and tensors (keyed by llama.cpp's names)."""

    path: Path
    reader: Any  # gguf.GGUFReader
    config: Qwen3Config
    generation_config: dict = field(default_factory=dict)
    tensors: dict[str, Any] = field(default_factory=dict)  # name -> gguf.ReaderTensor

    @classmethod
    def open(cls, path: str | Path) -> "GGUFCheckpoint":
        gguf = _import_gguf()
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"there is no GGUF file at {path}.")
        _check_start(path, tuple(getattr(gguf, "READER_SUPPORTED_VERSIONS", (2, 3))))
        try:
            # Copy-on-write mapping: torch can wrap its pages without a read-only warning, and nothing is copied.
            reader = _reader_class(gguf)(path, mode="c")
        except _Truncated as cut:
            size = path.stat().st_size
            raise CheckpointError(
                f"{path} is truncated or corrupt: it is {size:,} bytes, but its contents run to byte {cut.end:,}; "
                f"download or convert it again."
            ) from None
        except (ValueError, OSError, KeyError, IndexError, TypeError, OverflowError, MemoryError, struct.error) as err:
            raise CheckpointError(f"{path} is corrupt: the gguf package cannot read it ({err}); download or convert it again.") from None
        self = cls(path, reader, Qwen3Config())
        self.tensors = {t.name: t for t in reader.tensors}
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{path.name} holds a {arch!r} model; only these GGUF architectures are supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}."
            )
        self._check_tensor_types(gguf)
        self.config = self._read_config(arch)
        self.generation_config = self._read_generation_config()
        return self

    @property
    def quantized(self) -> bool:
        """Whether a matrix of the file is in one of GGML's quantized types (not F32, F16 or BF16)."""
        return any(t.tensor_type.name not in DENSE for t in self.tensors.values() if len(t.shape) == 2)

    def field(self, key: str, default: Any = ...) -> Any:
        """A metadata value (a list for arrays); `default` when absent, else a CheckpointError."""
        if key in self.reader.arrays:
            return self.reader.arrays[key]
        found = self.reader.get_field(key)
        if found is None:
            if default is ...:
                raise CheckpointError(f"{self.path.name} has no {key} metadata.")
            return default
        try:
            return found.contents()
        except (ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"{self.path.name} is corrupt: its {key} metadata cannot be read ({err}).") from None

    def _int(self, key: str, default: Any = ...) -> int:
        value = self.field(key, default)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise CheckpointError(f"{self.path.name}: {key} is {value!r}, not a single integer (per-layer values are not supported).")
        return int(value)

    def _check_tensor_types(self, gguf: Any) -> None:
        """Refuse, before allocating anything, a tensor type the gguf package cannot dequantize."""
        seen: set = set()
        for tensor in self.tensors.values():
            qtype = tensor.tensor_type
            if qtype in seen:
                continue
            try:  # one row is enough to find out
                gguf.quants.dequantize(tensor.data.reshape(-1, tensor.data.shape[-1])[:1], qtype)
            except NotImplementedError:
                raise CheckpointError(
                    f"{self.path.name} stores tensor {tensor.name} as {qtype.name}, which the gguf package cannot dequantize."
                ) from None
            seen.add(qtype)

    def _read_config(self, arch: str) -> Qwen3Config:
        key = lambda name: f"{arch}.{name}"  # noqa: E731
        hidden = self._int(key("embedding_length"))
        heads = self._int(key("attention.head_count"))
        head_dim = self._int(key("attention.key_length"), hidden // heads)
        value_dim = self._int(key("attention.value_length"), head_dim)
        if value_dim != head_dim:
            raise CheckpointError(f"{self.path.name}: key_length {head_dim} and value_length {value_dim} differ, which Qwen models never do.")
        rotary = self.field(key("rope.dimension_count"), head_dim)
        if rotary != head_dim:
            raise CheckpointError(f"{self.path.name}: partial rotary embeddings ({rotary} of {head_dim} dimensions) are not supported.")
        scaling = self.field(key("rope.scaling.type"), "none")
        if scaling != "none":
            raise CheckpointError(f"{self.path.name}: RoPE scaling of type {scaling!r} is not supported.")
        embedding = self.tensors.get("token_embd.weight")
        if embedding is None:
            raise CheckpointError(f"{self.path.name} has no tensor token_embd.weight.")
        blk0 = lambda name: f"blk.0.{name}" in self.tensors  # noqa: E731
        attention_bias = blk0("attn_q.bias")
        if arch == "qwen2" and not attention_bias:
            raise CheckpointError(f"{self.path.name} is a qwen2 model without attn_q.bias; Qwen2 always has query/key/value biases.")
        file_type = next((t.tensor_type.name for t in self.tensors.values() if len(t.shape) == 2), "BF16")
        return Qwen3Config(
            vocab_size=int(embedding.shape[1]),  # GGUF order: [hidden, vocab]
            hidden_size=hidden,
            num_hidden_layers=self._int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=self._int(key("attention.head_count_kv"), heads),
            head_dim=head_dim,
            intermediate_size=self._int(key("feed_forward_length")),
            max_position_embeddings=self._int(key("context_length")),
            rms_norm_eps=_decimal(self.field(key("attention.layer_norm_rms_epsilon"))),
            rope_theta=_decimal(self.field(key("rope.freq_base"), 10_000.0)),
            tie_word_embeddings="output.weight" not in self.tensors,
            torch_dtype={"F32": "float32", "F16": "float16"}.get(file_type, "bfloat16"),
            model_type=arch,
            qk_norm=blk0("attn_q_norm.weight"),
            attention_bias=attention_bias,
            o_proj_bias=blk0("attn_output.bias"),
        )

    def _read_generation_config(self) -> dict:
        """EOS IDs (eos, eot, eom and <|endoftext|>, which llama.cpp also ends on) and any general.sampling.* defaults."""
        eos = [self.field(f"tokenizer.ggml.{kind}_token_id", None) for kind in ("eos", "eot", "eom")]
        tokens = self.field("tokenizer.ggml.tokens", [])
        if "<|endoftext|>" in tokens:
            eos.append(tokens.index("<|endoftext|>"))
        config: dict = {"eos_token_id": list(dict.fromkeys(int(i) for i in eos if i is not None))}
        sampling = {
            name: self.field(f"general.sampling.{key}", None)
            for name, key in (("temperature", "temp"), ("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"), ("repetition_penalty", "penalty_repeat"))
        }
        sampling = {name: _decimal(value) if isinstance(value, float) else value for name, value in sampling.items() if value is not None}
        if sampling and sampling.get("temperature", 1.0) > 0:
            config.update(do_sample=True, **sampling)
        return config

    def tokenizer(self) -> Tokenizer:
        """The tokenizer.json beside the file, else the embedded one, else one rebuilt from the GGUF vocabulary."""
        tokens = self.field("tokenizer.ggml.tokens")
        special = {}
        for key in ("bos", "eos", "padding"):
            token_id = self.field(f"tokenizer.ggml.{key}_token_id", None)
            if token_id is not None:
                if not 0 <= token_id < len(tokens):
                    raise CheckpointError(f"{self.path.name}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary.")
                special["pad_token" if key == "padding" else f"{key}_token"] = tokens[token_id]
        beside = self.path.with_name("tokenizer.json")
        if beside.is_file():
            backend, origin = _backend_from_json(beside.read_text(encoding="utf-8"), beside), beside
        elif self.reader.get_field("tokenizer.huggingface.json") is not None:
            backend, origin = _backend_from_json(self.field("tokenizer.huggingface.json"), self.path), self.path
        else:
            backend, origin = self._backend_from_vocab(tokens), self.path
        for key, token in special.items():
            if backend.token_to_id(token) is None:
                raise CheckpointError(f"{origin} has no token {token!r}, the {key} of {self.path.name}.")
        return Tokenizer(backend, special_tokens=special, chat_template=self.field("tokenizer.chat_template", None), template_origin=self.path)

    def _backend_from_vocab(self, tokens: list[str]) -> Any:
        model = self.field("tokenizer.ggml.model", "gpt2")
        pre = self.field("tokenizer.ggml.pre", "qwen2")
        if model != "gpt2" or pre not in QWEN_PRE_TOKENIZERS:
            raise CheckpointError(
                f"{self.path.name} has a {model!r} tokenizer with pre-tokenizer {pre!r}, not Qwen's byte-level BPE; "
                f"put the model's tokenizer.json beside it."
            )
        types = self.field("tokenizer.ggml.token_type", None)
        if types is None:
            types = [CONTROL if t.startswith("<|") and t.endswith("|>") else NORMAL for t in tokens]
        if len(types) != len(tokens):
            raise CheckpointError(f"{self.path.name} has {len(tokens)} tokens but {len(types)} token types.")
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend

        vocab, added = {}, []
        for token_id, (token, kind) in enumerate(zip(tokens, types)):
            if kind != UNUSED:  # llama.cpp's [PAD<id>] fillers up to the embedding size are not real tokens
                vocab[token] = token_id  # added tokens too: their ids stay the file's whatever their order
            if kind in (CONTROL, USER_DEFINED):
                added.append(AddedToken(token, single_word=False, lstrip=False, rstrip=False, normalized=False, special=kind == CONTROL))
        # Built through the tokenizers API rather than as a tokenizer.json to parse: the same tokenizer, in a
        # fraction of the time (most of a GGUF file's load went into writing and parsing that JSON).
        merges = [tuple(merge.split(" ", 1)) for merge in self.field("tokenizer.ggml.merges")]
        backend = Backend(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False, ignore_merges=False))  # fmt: skip
        byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(**byte_level),
        ])  # fmt: skip
        backend.post_processor = processors.ByteLevel(**byte_level)
        backend.decoder = decoders.ByteLevel(**byte_level)
        backend.add_special_tokens([token for token in added if token.special])
        backend.add_tokens([token for token in added if not token.special])
        return backend

    def load_model(self, device: torch.device, dtype: torch.dtype, huge_pages: bool = True) -> Qwen3:
        """Build the model without initialising it; on a CPU, every layer whose matrices are all in a block format of
        blocks.py keeps them as they are, memory-mapped from the file; every other tensor is dequantized into place, a
        slice of rows at a time (with a notice for a quantized one)."""
        gguf = _import_gguf()
        model = unallocated_model(self.config, dtype)
        params = {gguf_name(name): t for name, t in model.checkpoint_tensors()}
        for name, param in params.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise CheckpointError(f"{self.path.name} has no tensor {name}, which its metadata requires.")
            shape = tuple(reversed([int(d) for d in tensor.shape]))
            if shape != tuple(param.shape):
                raise CheckpointError(f"tensor {name} has shape {list(shape)}, but the metadata of {self.path.name} implies {list(param.shape)}.")
        extra = sorted(set(self.tensors) - set(params))
        if extra:
            raise CheckpointError(f"{self.path.name} has a tensor {extra[0]} that this architecture does not use.")
        kept = self._block_layers(model) if device.type == "cpu" else {}
        for path in kept:  # out of the model while the dense rest is allocated
            model.set_submodule(path, nn.Identity())
        allocate(model, device, huge_pages)  # new storage: the parameters are looked up again
        with torch.no_grad():
            for path, names in kept.items():
                model.set_submodule(path, self._block_layer(path, names, dtype, gguf))
            if "embed_tokens" in kept and model.lm_head is None:  # a tied head multiplies the embedding's blocks
                model.lm_head = blocks.BlockLinear([model.embed_tokens.matrix])
            targets = list(model.checkpoint_tensors())
            types = {self.tensors[gguf_name(n)].tensor_type for n, t in targets if t.dim() == 2}
            dequantized = sorted(t.name for t in types if t.name not in DENSE and (device.type != "cpu" or t not in blocks.NAMES))
            if dequantized:
                where = "with the layers they are part of" if device.type == "cpu" else f"as every quantized type is on {device.type}"
                warnings.warn(
                    f"{self.path.name}: its {', '.join(dequantized)} tensors are dequantized to {str(dtype).split('.')[-1]} at "
                    f"load, {where}; the formats kept as they are on a CPU: {', '.join(blocks.NAMES.values())}.",
                    stacklevel=2,
                )
            for name, target in load_progress(targets, len(targets), self.path.name):
                dequantize_into(self.tensors[gguf_name(name)], target, gguf)
        return model.eval()

    def _block_layers(self, model: Qwen3) -> dict[str, list[str]]:
        """Module path -> the GGUF names of its matrices, for the embedding and each linear layer whose matrices are
        all in a format of blocks.NAMES."""
        layers = {}
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            *layer, local = path.split(".", 2)  # ["layers", "3"], "mlp.gate_up_proj"; [], "embed_tokens"
            names = [gguf_name(".".join([*layer, part, "weight"])) for part in STACKED.get(local, (local,))]
            if all(int(self.tensors[n].tensor_type) in blocks.NAMES for n in names):
                layers[path] = names
        return layers

    def _block_layer(self, path: str, names: list[str], dtype: torch.dtype, gguf: Any) -> nn.Module:
        """The layer at path as blocks.py's: its matrices' blocks viewed in the file's memory map (nothing read yet),
        its biases (Qwen2's q/k/v) dequantized to dtype."""
        matrices = []
        for name in names:
            tensor = self.tensors[name]
            rows = torch.from_numpy(tensor.data.reshape(-1, tensor.data.shape[-1]))  # a view of the mapped file
            matrices.append(blocks.BlockMatrix(rows, int(tensor.tensor_type), int(tensor.shape[0])))
        if path == "embed_tokens":
            return blocks.BlockEmbedding(matrices[0], dtype)
        biases = [self.tensors.get(name.replace(".weight", ".bias")) for name in names]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.empty(sum(m.rows for m in matrices), dtype=dtype)
            start = 0
            for tensor, matrix in zip(biases, matrices):
                dequantize_into(tensor, bias[start : start + matrix.rows][None], gguf)
                start += matrix.rows
        return blocks.BlockLinear(matrices, bias)


def dequantize_into(tensor: Any, out: torch.Tensor, gguf: Any = None) -> None:
    """Expand a GGUF tensor (a gguf.ReaderTensor of any type the gguf package reads) into `out`, in slices of rows."""
    gguf = gguf or _import_gguf()
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])  # raw blocks, for quantized types
    out = out.view(-1, out.shape[-1])
    step = max(1, _ROW_CHUNK_ELEMENTS // out.shape[1])
    for start in range(0, out.shape[0], step):
        values = gguf.quants.dequantize(rows[start : start + step], tensor.tensor_type)
        out[start : start + step].copy_(torch.from_numpy(np.ascontiguousarray(values)))


def _looks_special(token: str) -> bool:
    """llama.cpp's does_token_look_special, as far as Qwen's tokens go."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def write_tokenizer(writer: Any, checkpoint: Path, vocab_size: int) -> None:
    """Qwen's tokenizer files in `checkpoint` into a gguf.GGUFWriter, as llama.cpp's converter writes them (get_vocab_base
    and SpecialVocab, tokenizer model "gpt2"): for test and benchmark files made here."""
    gguf = _import_gguf()
    tok = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text(encoding="utf-8"))
    reverse = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            special = added[i]["special"] or _looks_special(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(151643)  # config.json's bos_token_id (tokenizer_config.json has none)
    writer.add_eos_token_id(ids[cfg["eos_token"]])
    writer.add_pad_token_id(ids[cfg["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(cfg["chat_template"])


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _backend_from_json(text: str, origin: Path) -> Any:
    from tokenizers import Tokenizer as BackendTokenizer

    try:
        return BackendTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
        raise CheckpointError(f"the tokenizer of {origin} is not a valid tokenizers file ({exc}).") from None


def load_model(checkpoint: GGUFCheckpoint, device: torch.device, dtype: torch.dtype, huge_pages: bool = True) -> Qwen3:
    return checkpoint.load_model(device, dtype, huge_pages)
