"""qwen3gen: a from-scratch, pure-PyTorch text-generation engine for Qwen3 models."""

from .config import PRESETS, Qwen3Config, preset
from .errors import CheckpointError, ContextLengthError, InvalidParameterError, ModelNotFoundError, Qwen3GenError
from .generate import Generation, GenerationStats
from .llm import LLM, ChatResult, load
from .model import Qwen3
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "LLM", "ChatResult", "CheckpointError", "ContextLengthError", "Generation", "GenerationStats",
    "InvalidParameterError", "ModelNotFoundError", "PRESETS", "Qwen3", "Qwen3Config", "Qwen3GenError",
    "SamplingParams", "Tokenizer", "load", "preset",
]
__version__ = "0.1.0"
