#!/usr/bin/env bash
# On the lent H200 (its own torch and transformers; nothing installed): CUDA correctness, a decode profile, the benchmark tables.
# Usage from the repository root: bash scripts/gpu_run.sh TOKENIZER_DIR OUTPUT_DIR [check|bench|more|diag|kernels|fusion|fused|attention|final|all]  (check runs the benches too)
# The tokenizer files must travel with the tree: here, `mkdir .tok && cp ../shared/qwen3-tokenizer/*.json .tok/`,
# `echo /.tok/ >> .git/info/exclude`, then name `.tok` in the device call's carry and pass `.tok $OUT`.
# Each step has its own time limit and log file, so a slow step cannot take the others' results with it;
# the bench prints each row as soon as it is measured. "check" (CUDA checks, batch-1 and batch-64 benches) and "more"
# (1,024-token TTFT, int8, profiles, attention alone, the Python API at batch 64) each fit one 10-minute call, and so
# does "diag" (batch 1 from a cold compile cache, matrix-vector products alone, batch-1 variants); "kernels" takes 3 minutes.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
out="$2"
what="${3:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
bench() {
    local log=$1 limit=$2; shift 2
    echo "\$ qwen3gen bench --device cuda --dtype bfloat16 $*" > "$out/$log.log"
    timeout "$limit" python3 -m qwen3gen.cli bench --device cuda --dtype bfloat16 "$@" >> "$out/$log.log" 2>&1
}
if [ "$what" = check ] || [ "$what" = all ]; then
    timeout 180 python3 scripts/gpu_check.py "$1" > "$out/check.log" 2>&1
fi
if [ "$what" = bench ] || [ "$what" = check ] || [ "$what" = all ]; then
    bench bench-batch1 240 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --engines transformers,qwen3gen-compiled,qwen3gen,transformers-static
    bench bench-batch64 200 --prompt-tokens 32 --new-tokens 256 --batch 64 --reps 3 --engines transformers,qwen3gen-compiled
fi
if [ "$what" = more ] || [ "$what" = all ]; then
    bench bench-ttft1024 90 --prompt-tokens 1024 --new-tokens 16 --batch 1 --reps 5 --engines transformers,qwen3gen-compiled
    bench bench-int8 150 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --quantize int8 --engines transformers,qwen3gen-compiled
    timeout 70 python3 scripts/gpu_variants.py engine base 1 > "$out/profile.log" 2>&1
    timeout 80 python3 scripts/gpu_variants.py engine base 64 > "$out/profile64.log" 2>&1
    timeout 40 python3 scripts/gpu_attention.py > "$out/attention.log" 2>&1
    timeout 150 python3 scripts/gpu_overlap.py "$1" > "$out/overlap.log" 2>&1
fi
if [ "$what" = fused ]; then  # the fused decode-attention kernel: alone, in the engine from a cold cache, then the checks
    cold=$(mktemp -d)
    export TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton
    timeout 110 python3 scripts/gpu_variants.py engine base > "$out/engine-base.log" 2>&1
    timeout 150 python3 scripts/gpu_check.py "$1" > "$out/check.log" 2>&1
    timeout 80 python3 scripts/gpu_variants.py engine base+nofused > "$out/engine-nofused.log" 2>&1
    timeout 80 python3 scripts/gpu_variants.py engine base+nomatvec > "$out/engine-nomatvec.log" 2>&1
    timeout 100 python3 scripts/gpu_attention.py > "$out/attention.log" 2>&1
fi
if [ "$what" = final ]; then  # one call: the CUDA checks, then the goals' bench rows (batch 1, batch 64, 1,024-token TTFT)
    timeout 200 python3 scripts/gpu_check.py "$1" > "$out/check.log" 2>&1
    bench bench-batch1 220 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 --engines transformers,qwen3gen-compiled,qwen3gen,transformers-static
    bench bench-batch64 120 --prompt-tokens 32 --new-tokens 256 --batch 64 --reps 3 --engines transformers,qwen3gen-compiled
    bench bench-ttft1024 80 --prompt-tokens 1024 --new-tokens 16 --batch 1 --reps 5 --engines transformers,qwen3gen-compiled
fi
if [ "$what" = attention ]; then  # kernels.decode_attention against SDPA in the engine, from a cold cache
    cold=$(mktemp -d)
    export TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton
    timeout 110 python3 scripts/gpu_variants.py engine base > "$out/engine-base.log" 2>&1
    timeout 80 python3 scripts/gpu_variants.py engine base+sdpa > "$out/engine-sdpa.log" 2>&1
    timeout 100 python3 scripts/gpu_variants.py engine base 64 > "$out/engine-base64.log" 2>&1
fi
if [ "$what" = kernels ]; then  # a hand-written Triton matrix-vector kernel over a grid of settings, against inductor's
    timeout 200 python3 scripts/gpu_variants.py triton > "$out/triton.log" 2>&1
fi
if [ "$what" = fusion ]; then  # batch 1 from a cold cache, then with aggressive fusion on the same cache
    cold=$(mktemp -d)
    export TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton
    timeout 110 python3 scripts/gpu_variants.py engine base > "$out/engine-base.log" 2>&1
    timeout 110 python3 scripts/gpu_variants.py engine base+aggressive > "$out/engine-aggressive.log" 2>&1
fi
if [ "$what" = diag ]; then
    cold=$(mktemp -d)  # batch 1 with this commit's code, its warm-up from empty compile caches
    export TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton
    timeout 110 python3 scripts/gpu_variants.py engine base > "$out/engine-base.log" 2>&1
    for variant in prefetchsplit prefetchnext; do  # the same compile cache, so the same tuned kernels
        timeout 70 python3 scripts/gpu_variants.py engine base+$variant > "$out/engine-$variant.log" 2>&1
    done
    timeout 60 python3 scripts/gpu_variants.py micro down > "$out/micro-down.log" 2>&1
    cold=$(mktemp -d)  # wider tuning, from empty caches: its own kernels and its own warm-up
    export TORCHINDUCTOR_CACHE_DIR=$cold/inductor TRITON_CACHE_DIR=$cold/triton
    timeout 150 python3 scripts/gpu_variants.py engine base+cdtwide > "$out/engine-cdtwide.log" 2>&1
fi
