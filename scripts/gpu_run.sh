#!/usr/bin/env bash
# On the lent H200 (its own torch and transformers; nothing installed): CUDA correctness, then the benchmark tables.
# Usage from the repository root: bash scripts/gpu_run.sh TOKENIZER_DIR OUTPUT_DIR [check|bench|all]
# The tokenizer files must travel with the tree: here, `mkdir .tok && cp ../shared/qwen3-tokenizer/*.json .tok/`,
# `echo /.tok/ >> .git/info/exclude`, then name `.tok` in the device call's carry and pass `.tok $OUT`.
# Each step has its own time limit and log file, so a slow step cannot take the others' results with it;
# the bench prints each row as soon as it is measured.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TORCH_LOGS=perf_hints  # perf_hints: why a CUDA graph was skipped
out="$2"
what="${3:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
if [ "$what" != bench ]; then
    timeout 210 python3 scripts/gpu_check.py "$1" > "$out/check.log" 2>&1
fi
[ "$what" = check ] && exit 0
step=0
bench() {
    step=$((step + 1))
    local limit=$1; shift
    echo "\$ qwen3gen bench --device cuda --dtype bfloat16 $*" > "$out/bench$step.log"
    timeout "$limit" python3 -m qwen3gen.cli bench --device cuda --dtype bfloat16 "$@" >> "$out/bench$step.log" 2>&1
}
bench 170 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --engines transformers,qwen3gen-compiled,qwen3gen,transformers-static
bench 100 --prompt-tokens 32 --new-tokens 256 --batch 64 --reps 2 --engines transformers,qwen3gen-compiled
bench 60 --prompt-tokens 1024 --new-tokens 8 --batch 1 --reps 5 --engines qwen3gen-compiled
bench 70 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --quantize int8 --engines qwen3gen-compiled
