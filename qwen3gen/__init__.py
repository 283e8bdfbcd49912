"""qwen3gen: a from-scratch, pure-PyTorch text-generation engine for Qwen3 models."""

from .config import PRESETS, Qwen3Config, preset
from .engine import Engine, RequestOutput
from .errors import (
    CheckpointError, ContextLengthError, EngineError, InvalidParameterError, ModelNotFoundError, OutOfMemoryError,
    Qwen3GenError,
)
from .llm import LLM, ChatResult, load
from .model import Qwen3
from .results import Generation, GenerationStats
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "LLM", "ChatResult", "CheckpointError", "ContextLengthError", "Engine", "EngineError", "Generation",
    "GenerationStats", "InvalidParameterError", "ModelNotFoundError", "OutOfMemoryError", "PRESETS", "Qwen3",
    "Qwen3Config", "Qwen3GenError", "RequestOutput", "SamplingParams", "Tokenizer", "load", "preset",
]
__version__ = "0.1.0"
