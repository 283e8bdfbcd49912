"""Write Hugging Face checkpoints with random weights, the way users' checkpoints look on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

TINY = dict(
    vocab_size=151936,  # the real vocabulary, so the real tokenizer fits
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=128,
    max_position_embeddings=512,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    initializer_range=0.5,  # peaked logits: greedy choices are far from ties
)

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, intermediate_size=3072, max_position_embeddings=40960, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)

REASONING_GENERATION_CONFIG = {
    "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
    "temperature": 0.6, "top_k": 20, "top_p": 0.95,
}
BASE_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}


def hf_model(seed: int = 0, **overrides: object) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**{**TINY, **overrides})
    return transformers.Qwen3ForCausalLM(config).eval()


def hf_qwen2_model(seed: int = 0, **overrides: object) -> transformers.Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM (Qwen2 / Qwen2.5): TINY's shape with head_dim = hidden_size // heads unless given.

    transformers starts the q/k/v biases at zero, which would hide a bias that is never loaded: they are randomised.
    """
    torch.manual_seed(seed)
    shape = {k: v for k, v in TINY.items() if k != "head_dim"}
    config = transformers.Qwen2Config(**{**shape, **overrides})
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=config.initializer_range)
    return model


def write_checkpoint(
    directory: Path,
    tokenizer_dir: Path,
    model: transformers.Qwen3ForCausalLM,
    generation_config: dict | None = None,
    layout: str = "v5",
    max_shard_size: str | None = None,
) -> Path:
    """save_pretrained + the real tokenizer files + a generation_config.json.

    layout "v4" rewrites config.json as the Hub serves Qwen3 today (top-level rope_theta, torch_dtype).
    """
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    (directory / "generation_config.json").write_text(json.dumps(generation_config or REASONING_GENERATION_CONFIG))
    if layout == "v4":
        config = json.loads((directory / "config.json").read_text())
        rope = config.pop("rope_parameters", None) or {}
        config["rope_theta"] = rope.get("rope_theta", 1_000_000.0)
        config["rope_scaling"] = None
        config["torch_dtype"] = config.pop("dtype", "float32")
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
