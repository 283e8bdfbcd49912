#!/usr/bin/env bash
# On the lent H200 (its own torch and transformers; nothing installed): CUDA correctness, then the benchmark tables.
# Usage from the repository root: bash scripts/gpu_run.sh TOKENIZER_DIR
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 scripts/gpu_check.py "$1"
bench() { echo; echo "\$ qwen3gen bench $*"; python3 -m qwen3gen.cli bench --device cuda --dtype bfloat16 "$@"; }
bench --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3
bench --prompt-tokens 32 --new-tokens 256 --batch 64 --reps 3
bench --prompt-tokens 1024 --new-tokens 16 --batch 1 --reps 5 --engines qwen3gen,qwen3gen-compiled
bench --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --quantize int8 --engines qwen3gen-compiled
