"""qwen3gen: a from-scratch, pure-PyTorch text-generation engine for Qwen3 models.

The names below are imported when first used (PEP 562), so that the CLI answers --help and --version without
importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    CheckpointError, ContextLengthError, EngineError, InvalidParameterError, ModelNotFoundError, OutOfMemoryError,
    Qwen3GenError,
)

if TYPE_CHECKING:
    from .config import PRESETS, Qwen3Config, preset
    from .engine import Engine, RequestOutput
    from .llm import LLM, ChatResult, load
    from .model import Qwen3
    from .results import Generation, GenerationStats
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

_LAZY = {
    "PRESETS": "config", "Qwen3Config": "config", "preset": "config", "Engine": "engine", "RequestOutput": "engine",
    "LLM": "llm", "ChatResult": "llm", "load": "llm", "Qwen3": "model", "Generation": "results",
    "GenerationStats": "results", "SamplingParams": "sampling", "Tokenizer": "tokenizer",
}  # fmt: skip

__all__ = [
    "LLM", "ChatResult", "CheckpointError", "ContextLengthError", "Engine", "EngineError", "Generation",
    "GenerationStats", "InvalidParameterError", "ModelNotFoundError", "OutOfMemoryError", "PRESETS", "Qwen3",
    "Qwen3Config", "Qwen3GenError", "RequestOutput", "SamplingParams", "Tokenizer", "load", "preset",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
