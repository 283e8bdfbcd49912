"""Shared fixtures: the real Qwen3 tokenizer files, found in ../shared or through QWEN3GEN_TOKENIZER_DIR."""

import os
from pathlib import Path

# qwen3gen.kernels' Triton kernel runs on CPU tensors only through Triton's interpreter, chosen at import.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
from checkpoints import hf_model, write_checkpoint

import qwen3gen

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_DIR = REPO_ROOT.parent / "shared" / "qwen3-tokenizer"

@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The directory holding tokenizer.json and tokenizer_config.json; a missing one fails, never skips."""
    path = Path(os.environ.get("QWEN3GEN_TOKENIZER_DIR", DEFAULT_TOKENIZER_DIR))
    if not (path / "tokenizer.json").is_file() or not (path / "tokenizer_config.json").is_file():
        pytest.fail(
            f"the real Qwen3 tokenizer files are not in {path}; "
            "set QWEN3GEN_TOKENIZER_DIR to the folder that holds tokenizer.json and tokenizer_config.json"
        )
    return path

@pytest.fixture(scope="session")
def tiny_hf():
    return hf_model()

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir, tiny_hf) -> Path:
    """A tiny random Qwen3 (real vocabulary) saved by transformers, with the real tokenizer files."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir, tiny_hf)

@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint):
    return qwen3gen.load(tiny_checkpoint, device="cpu", dtype="float32")
