"""Model shape: read from a checkpoint's config.json (Qwen3, or Qwen2 / Qwen2.5), or taken from a preset for each dense Qwen3 size."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2")


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"  # the dtype the weights were saved in
    # Switches between the family's architectures (see model.py); the defaults are Qwen3's.
    model_type: str = "qwen3"  # "qwen3" or "qwen2" (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen)
    qk_norm: bool = True  # RMSNorm on every query and key head (Qwen3), or none (Qwen2)
    attention_bias: bool = False  # biases on q_proj, k_proj, v_proj (always on in Qwen2)
    o_proj_bias: bool = False  # a bias on o_proj (Qwen3 with attention_bias; never in Qwen2)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for rotary embeddings, not {self.head_dim}.")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.torch_dtype)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "Qwen3Config":
        """Accept config.json as transformers 4.x writes it (rope_theta, torch_dtype) and as 5.x does (rope_parameters, dtype)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"RoPE scaling of type {rope_type!r} is not supported.")
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ()):
            raise CheckpointError(
                "config.json asks for sliding-window attention (use_sliding_window: true), which is not implemented."
            )
        qwen2 = model_type == "qwen2"  # transformers' Qwen2 has q/k/v biases and no q/k norm whatever config.json says
        attention_bias = True if qwen2 else bool(cfg.get("attention_bias", False))
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg["intermediate_size"],
                max_position_embeddings=cfg["max_position_embeddings"],
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
                model_type=model_type,
                qk_norm=not qwen2,
                attention_bias=attention_bias,
                o_proj_bias=attention_bias and not qwen2,
            )
        except KeyError as missing:
            raise CheckpointError(f"config.json has no {missing.args[0]!r} field.") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist.") from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}).") from None
        return cls.from_hf_dict(cfg)

    def replace(self, **changes: object) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)


def _preset(hidden: int, layers: int, heads: int, mlp: int, tied: bool) -> Qwen3Config:
    return Qwen3Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        tie_word_embeddings=tied,
    )


# Shapes of the published dense Qwen3 checkpoints (all: vocab 151936, 8 KV heads, head_dim 128, context 40960).
PRESETS: dict[str, Qwen3Config] = {
    "0.6B": _preset(1024, 28, 16, 3072, tied=True),
    "1.7B": _preset(2048, 28, 16, 6144, tied=True),
    "4B": _preset(2560, 36, 32, 9728, tied=True),
    "8B": _preset(4096, 36, 32, 12288, tied=False),
    "14B": _preset(5120, 40, 40, 17408, tied=False),
    "32B": _preset(5120, 64, 64, 25600, tied=False),
}


def preset(name: str) -> Qwen3Config:
    """The config of a dense Qwen3 size, e.g. preset("0.6B")."""
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise CheckpointError(f"unknown preset {name!r} (known: {', '.join(PRESETS)}).") from None
