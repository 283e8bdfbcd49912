#!/usr/bin/env bash
# On the lent H200 (its own torch and transformers; nothing installed): the CUDA checks, then the goals' bench rows.
# Usage from the repository root: bash scripts/gpu_run.sh TOKENIZER_DIR OUTPUT_DIR [STEP ...]
# Steps: check throughput batch64 batch1 ttft (the default, "engine": the checks and the engine's goals, up to 10
# minutes, one device call), profile1 (where a batch-1 step's time goes), serve-eager serve-compiled ("serve": the server
# under load, issue 16's goals, another call); "all" is both defaults.
# The tokenizer files must travel with the tree: here, `mkdir .tok && cp ../shared/qwen3-tokenizer/*.json .tok/`,
# `echo /.tok/ >> .git/info/exclude`, then name `.tok` in the device call's carry and pass `.tok $OUT`. The device has
# no server packages: for "serve", `pip install --target .devdeps --python-version 3.12 --only-binary=:all:
# --platform manylinux2014_x86_64 fastapi uvicorn prometheus-client httpx` here (excluded like .tok) and carry it too.
# Each step has its own time limit and log file, so a slow step cannot take the others' results with it.
# BASE=DIR (a folder holding an earlier commit's qwen3gen/, e.g. `mkdir .base && git archive REV qwen3gen | tar -x -C
# .base`, excluded like .tok and carried): every bench row runs there too, after this tree's, on the same machine.
# transformers' throughput row (minutes on this workload) is left to a call of its own.
set -uo pipefail
export PYTHONPATH="$PWD:$PWD/.devdeps" PYTHONUNBUFFERED=1
tok="$(realpath "$1")" out="$(realpath "$2")"
shift 2
engine=(check throughput batch64 batch1 ttft)
serve=(serve-eager serve-compiled)
steps=()
for word in "${@:-engine}"; do
    case $word in
        engine) steps+=("${engine[@]}") ;;
        serve) steps+=("${serve[@]}") ;;
        all) steps+=("${engine[@]}" "${serve[@]}") ;;
        *) steps+=("$word") ;;
    esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
bench() {
    local log=$1 limit=$2; shift 2
    echo "\$ qwen3gen bench --device cuda --dtype bfloat16 $*" > "$out/$log.log"
    timeout "$limit" python3 -m qwen3gen.cli bench --device cuda --dtype bfloat16 "$@" >> "$out/$log.log" 2>&1
    if [ -n "${BASE:-}" ]; then  # the same row from an earlier tree, in the same call: $log-base.log
        echo "\$ [$BASE] qwen3gen bench --device cuda --dtype bfloat16 $*" > "$out/$log-base.log"
        (cd "$BASE" && timeout "$limit" python3 -m qwen3gen.cli bench --device cuda --dtype bfloat16 "$@") \
            >> "$out/$log-base.log" 2>&1  # python3 -m puts $BASE first on the path: its qwen3gen is the one imported
    fi
}
for step in "${steps[@]}"; do
    case $step in
        check) timeout 170 python3 scripts/gpu_check.py "$tok" > "$out/check.log" 2>&1 ;;
        throughput) bench bench-throughput 190 --throughput --engines qwen3gen,qwen3gen-compiled ;;
        batch64) bench bench-batch64 140 --prompt-tokens 32 --new-tokens 256 --batch 64 --reps 3 \
            --engines transformers,qwen3gen,qwen3gen-compiled ;;
        batch1) bench bench-batch1 150 --prompt-tokens 32 --new-tokens 256 --batch 1 --reps 3 \
            --engines transformers,qwen3gen,qwen3gen-compiled ;;
        ttft) bench bench-ttft1024 45 --prompt-tokens 1024 --new-tokens 16 --batch 1 --reps 5 --engines transformers,qwen3gen ;;
        profile1) timeout 90 python3 scripts/gpu_profile.py batch1 > "$out/profile-batch1.log" 2>&1 ;;
        serve-eager) bench bench-serve 300 --serve --tokenizer "$tok" ;;
        serve-compiled) bench bench-serve-compiled 300 --serve --tokenizer "$tok" --compile ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
