"""Hugging Face checkpoints: find them (local folder or Hub repo), check them, and load their weights.

Weights are read with safetensors only (no pickle), one tensor at a time, straight into a model whose
storage was allocated once in the target dtype and device: there is never a second full copy.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from ..config import Qwen3Config
from ..errors import CheckpointError, InvalidParameterError, ModelNotFoundError
from ..kernels.cpu import huge_page_weights
from ..model import Qwen3
from ..parallel import Shard, shard_config, shard_layers, shard_part

T = TypeVar("T")
Part = tuple[int, int, int]  # (axis, start, stop) of a tensor

MODEL_ALIASES = {"base": "Qwen/Qwen3-0.6B-Base", "reasoning": "Qwen/Qwen3-0.6B"}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Buffers some old exports saved; they are recomputed, never loaded.
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def resolve(model: str) -> Path:
    """A local checkpoint folder for `model`: a path, a Hub repo id, or an alias (base, reasoning)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{model} is a file, not a checkpoint folder (config.json, *.safetensors, tokenizer.json).")
    repo_id = MODEL_ALIASES.get(model, model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model.replace("/", ""):
        raise ModelNotFoundError(f"there is no checkpoint folder at {model}.")
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(
            f"{model} is neither a checkpoint folder nor a Hugging Face repo id like Qwen/Qwen3-0.6B "
            f"(aliases: {', '.join(MODEL_ALIASES)})."
        )
    return download(repo_id)


def download(repo_id: str) -> Path:
    """Fetch (or find in the Hugging Face cache) the files a checkpoint needs; returns the snapshot folder."""
    import huggingface_hub
    from huggingface_hub import errors

    repo_id = MODEL_ALIASES.get(repo_id, repo_id)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except errors.GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated on the Hugging Face Hub: accept its licence and log in (hf auth login).") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"there is no model {repo_id} on the Hugging Face Hub (or it is private).") from None
    except errors.LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and {reason}; connect to the internet or pass a checkpoint folder."
        ) from None
    except errors.HFValidationError as err:  # passes our pattern but not the Hub's rules, e.g. "a/b--c"
        raise ModelNotFoundError(f"{repo_id} is not a valid Hugging Face repo id ({_first_line(err)})") from None
    except (errors.HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"downloading {repo_id} failed: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (our modules mirror Qwen3ForCausalLM under its `model.`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


@dataclass
class Checkpoint:
    """A checkpoint folder: its config, generation defaults, and where each tensor lives."""

    directory: Path
    config: Qwen3Config
    generation_config: dict = field(default_factory=dict)
    tensor_files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | Path) -> "Checkpoint":
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} has no config.json, so it is not a Hugging Face checkpoint.")
        config = Qwen3Config.from_file(directory / "config.json")
        return cls(directory, config, _read_generation_config(directory), _tensor_files(directory))

    def tensors(self, names: list[str], parts: dict[str, Part] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, each file memory-mapped and opened once; a name in `parts` as only its
        part (axis, start, stop): a tensor-parallel rank's share, the rest never read."""
        parts = parts or {}
        with ExitStack() as stack:
            handles = {}
            for name in names:
                file = self.tensor_files[name]
                try:
                    if file not in handles:
                        handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                    if name in parts:
                        axis, start, stop = parts[name]
                        tensor = handles[file].get_slice(name)[(slice(None),) * axis + (slice(start, stop),)]
                    else:
                        tensor = handles[file].get_tensor(name)
                except (SafetensorError, OSError) as err:
                    raise CheckpointError(f"{file} is corrupt or unreadable ({err}).") from None
                yield name, tensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for file in sorted(set(self.tensor_files.values())):
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        shapes[name] = tuple(handle.get_slice(name).get_shape())
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{file} is corrupt or unreadable ({err}).") from None
        return shapes


def _read_generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).") from None


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to its file: from the shard index if there is one, else from the file headers."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid shard index ({err}).") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise CheckpointError(f"shard {missing[0]} named in {index.name} is missing from {directory}.")
        return {name: directory / f for name, f in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" (found {pickles[0]}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{directory} has no *.safetensors weights{hint}.")
    tensor_files = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                tensor_files.update(dict.fromkeys(handle.keys(), file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is corrupt or unreadable ({err}).") from None
    return tensor_files


def check_tensors(model: Qwen3, checkpoint: Checkpoint) -> list[str]:
    """Checkpoint names to load, in model order; refuses missing, extra or mis-shaped tensors by name."""
    expected = {hf_name(name): tuple(t.shape) for name, t in model.checkpoint_tensors()}
    found = {n: s for n, s in checkpoint.shapes().items() if not _IGNORED_TENSORS.match(n)}
    if model.lm_head is None:
        found.pop("lm_head.weight", None)  # a tied head may be saved too; the embedding is the one used
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(f"the checkpoint has no tensor {name}, which config.json requires.")
        if found[name] != shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(found[name])}, but config.json implies {list(shape)}."
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"the checkpoint has a tensor {extra[0]} that this config does not use.")
    return list(expected)


def load_progress(items: Iterable[T], total: int, what: str) -> Iterable[T]:
    """items, with a progress bar on stderr while they are loaded, when stderr is a terminal (never in logs or pipes)."""
    return tqdm(items, total=total, desc=f"loading {what}", unit=" tensors", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())  # fmt: skip


class _SkipInit(TorchFunctionMode):
    """Leaves meta tensors' random initialisation undone: there is nothing to initialise, and meta's normal_ alone
    imports seconds of PyTorch's Python decompositions on first use."""

    # nn.init's functions reach the mode themselves (then call the tensor's method outside it), the methods otherwise
    SKIPPED = frozenset({
        torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_,
    })  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        tensor = args[0] if args else (kwargs or {}).get("tensor")  # nn.init passes its tensor by name
        if func in self.SKIPPED and tensor is not None and tensor.is_meta:
            return tensor
        return func(*args, **(kwargs or {}))


def unallocated_model(cfg: Qwen3Config, dtype: torch.dtype, shard: Shard | None = None) -> Qwen3:
    """The model's modules with meta tensors of `dtype` (no memory, no initialisation), for to_empty and a load; with
    a shard, that tensor-parallel rank's part of the model (parallel.py)."""
    with torch.device("meta"), _SkipInit():
        if shard is None:
            return Qwen3(cfg).to(dtype)
        model = Qwen3(shard_config(cfg, shard.size))
        shard_layers(model, shard, cfg.vocab_size)
        return model.to(dtype)


def allocate(model: Qwen3, device: torch.device, huge_pages: bool) -> None:
    """Storage for an unallocated model's tensors, values undefined; with huge_pages, on a CPU in memory for 2 MiB
    pages, which the decode kernels read faster (kernels/cpu.py), so that the weights are copied into place once.
    Not for weights about to be replaced (quantized): their block would stay held by the tensors left in it.
    torch.empty for each tensor (a tensor shared by two modules stays one), as Module.to_empty does but without
    empty_like of a meta tensor, whose first call imports torch's symbolic-shapes machinery (a third of a second)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) not in made:
                fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                made[id(tensor)] = nn.Parameter(fresh, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fresh
            setattr(module, name, made[id(tensor)])
    if huge_pages and device.type == "cpu":
        huge_page_weights(model, copy=False)


def load_model(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, huge_pages: bool = True, shard: Shard | None = None
) -> Qwen3:
    """Build the model without initialising it, then copy each checkpoint tensor into place (see allocate); with a
    shard, only that rank's part of each tensor is read (parallel.shard_part), and spare rows past it are zeros."""
    whole = unallocated_model(checkpoint.config, dtype)
    names = check_tensors(whole, checkpoint)
    model = whole if shard is None else unallocated_model(checkpoint.config, dtype, shard)
    allocate(model, device, huge_pages)
    targets = {hf_name(n): t for n, t in model.checkpoint_tensors()}  # views into the new storage
    parts = {}
    if shard is not None:
        full = {hf_name(n): tuple(t.shape) for n, t in whole.checkpoint_tensors()}
        parts = {n: p for n in names if (p := shard_part(n, full[n], tuple(targets[n].shape), shard.rank))}
    with torch.no_grad():
        for name, tensor in load_progress(checkpoint.tensors(names, parts), len(names), checkpoint.directory.name):
            target = targets[name]
            if name in parts:
                axis, start, stop = parts[name]
                target.narrow(axis, stop - start, target.shape[axis] - (stop - start)).zero_()
                target = target.narrow(axis, 0, stop - start)
            target.copy_(tensor)
    return model.eval()


def default_device() -> torch.device:
    """cuda, then mps, then xpu, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


SUPPORTED_DEVICES = ("cuda", "mps", "xpu", "cpu")


def _device_count(kind: str) -> int:
    """How many devices of a supported type this machine has (0 when its backend is missing or unusable)."""
    try:
        if kind == "cpu":
            return 1
        if kind == "cuda":
            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        if kind == "mps":
            return int(torch.backends.mps.is_available())
        if kind == "xpu":
            return torch.xpu.device_count() if hasattr(torch, "xpu") and torch.xpu.is_available() else 0
    except (RuntimeError, AssertionError):  # a backend compiled in but broken (no driver, …)
        return 0
    return 0


def available_devices() -> list[str]:
    """The device types this machine can run the model on, in default_device's order."""
    return [kind for kind in SUPPORTED_DEVICES if _device_count(kind)]


def parse_device(device: str | torch.device | None) -> torch.device:
    """The torch.device to load onto: default_device() for None; a name such as "cuda", "cuda:1", "mps" or "cpu"
    (any case), or a torch.device. Refuses, before anything is read, a device that does not exist here."""
    if device is None:
        return default_device()
    available = ", ".join(available_devices())
    if isinstance(device, str):
        try:
            parsed = torch.device(device.strip().lower())
        except (RuntimeError, ValueError):
            raise InvalidParameterError(
                f"device {device!r} is not a device name such as 'cuda', 'cuda:1', 'mps' or 'cpu'; available here: {available}."
            ) from None
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise InvalidParameterError(
            f"device must be a name such as 'cuda', 'cuda:1', 'mps' or 'cpu', or a torch.device, not {device!r}; "
            f"available here: {available}."
        )
    kind = parsed.type
    if kind == "meta":
        raise InvalidParameterError(f"device 'meta' holds no data, so a model cannot run on it; use one of: {available}.")
    if kind not in SUPPORTED_DEVICES:
        raise InvalidParameterError(
            f"device {str(parsed)!r} is not supported (only {', '.join(SUPPORTED_DEVICES)}); available here: {available}."
        )
    if kind == "cpu":
        return torch.device("cpu")  # torch ignores a CPU index
    count = _device_count(kind)
    if count == 0:
        raise InvalidParameterError(f"device {str(parsed)!r} is not available on this machine; available here: {available}.")
    if parsed.index is not None and parsed.index >= count:
        raise InvalidParameterError(
            f"device {str(parsed)!r} does not exist: this machine has {count} {kind} device{'s' if count > 1 else ''} "
            f"({', '.join(f'{kind}:{i}' for i in range(count))})."
        )
    return parsed


def default_dtype(device: torch.device, quantized: bool = False) -> torch.dtype:
    """bf16 on accelerators (half the bytes to read per token), float32 on the CPU; bf16 activations with quantized
    weights (int8, int4, a GGUF file's blocks), the dtype the CPU's integer block products and PyTorch's fused int8
    kernels take."""
    return torch.float32 if device.type == "cpu" and not quantized else torch.bfloat16


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """None, or torch.float32 / bfloat16 / float16, given as the dtype or a name (float32, bf16, fp16, half, …; any case)."""
    if name is None or (isinstance(name, torch.dtype) and name in DTYPES.values()):
        return name
    key = name.strip().lower().removeprefix("torch.") if isinstance(name, str) else None
    if key not in DTYPES and key not in DTYPE_ALIASES:
        raise InvalidParameterError(
            f"dtype must be one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}), not {name!r}."
        )
    return DTYPES[DTYPE_ALIASES.get(key, key)]


def _offline() -> bool:
    """HF_HUB_OFFLINE in the environment, or offline mode as huggingface_hub decided it (it reads the
    variable, and TRANSFORMERS_OFFLINE, once at import; its constant may also be set in code)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or constants.is_offline_mode()
