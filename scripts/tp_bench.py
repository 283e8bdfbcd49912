"""Issue 17's GPU figures, for a machine of two or more CUDA devices: tensor-parallel batch-1 decode against tp=1.

Writes a Qwen3-8B-shaped checkpoint of random bf16 weights (safetensors, Hugging Face names) with the tokenizer files
of TOKENIZER_DIR, then for each tp: loads it, checks the engine's greedy tokens for 32 steps against tp=1's, and times
batch-1 decode (TOKENS new tokens after a 32-token prompt, ignore_eos, best of REPS).

    python scripts/tp_bench.py TOKENIZER_DIR WORK_DIR [--tp 1,2] [--tokens 256] [--reps 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import qwen3gen
from qwen3gen.config import preset
from qwen3gen.loaders.checkpoint import hf_name, unallocated_model


def write_random_checkpoint(directory: Path, tokenizer_dir: Path) -> Path:
    """An 8B-shaped checkpoint, one safetensors file per layer (each written as it is made: no full copy in memory)."""
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    cfg = preset("8B")
    generator = torch.Generator().manual_seed(0)
    names: dict[str, list[tuple[str, tuple]]] = {}
    for name, tensor in unallocated_model(cfg, torch.bfloat16).checkpoint_tensors():
        part = name.split(".")[1] if name.startswith("layers.") else "rest"
        names.setdefault(part, []).append((hf_name(name), tuple(tensor.shape)))
    weight_map = {}
    for part, tensors in names.items():
        file = f"model-{part}.safetensors"
        made = {}
        for name, shape in tensors:
            std = 1.0 if name.endswith("norm.weight") else shape[-1] ** -0.5
            made[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            weight_map[name] = file
        save_file(made, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "qwen3", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--tp", default="1,2")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    checkpoint = write_random_checkpoint(args.work_dir / "qwen3-8b-random", args.tokenizer_dir)
    prompt = list(range(1000, 1032))
    rows, reference = [], None
    for size in (int(s) for s in args.tp.split(",")):
        with qwen3gen.load(checkpoint, device="cuda", dtype="bfloat16", compile=args.compile, kv_memory="4GiB",
                           tensor_parallel_size=size) as llm:  # fmt: skip
            llm.engine.warm_up()
            greedy = llm.generate(prompt, max_new_tokens=32, temperature=0, ignore_eos=True).token_ids
            reference = reference or greedy
            best = 0.0
            for _ in range(args.reps):
                out = llm.generate(prompt, max_new_tokens=args.tokens, temperature=0, ignore_eos=True)
                best = max(best, out.stats.decode_tokens_per_s)
            same = next((i for i, (a, b) in enumerate(zip(greedy, reference)) if a != b), len(greedy))
            rows.append((size, best, same))
            print(f"tp={size}: decode {best:,.1f} tok/s, greedy tokens equal to tp=1's for {same} of 32", flush=True)
    base = rows[0][1]
    for size, speed, _ in rows:
        print(f"tp={size}: {speed / base:.2f}x tp={rows[0][0]}")


if __name__ == "__main__":
    main()
