"""Where the compiled decode step's time goes: ms per step and the top GPU kernels, Qwen3-0.6B shape, bf16.

Usage (on the GPU machine, from the repository root): python3 scripts/gpu_profile.py [BATCH]
"""

from __future__ import annotations

import sys
import time

import torch

from qwen3gen import preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.sampling import SamplingParams


def main(batch: int = 1) -> None:
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), f"batch {batch}", flush=True)
    engine = Engine(random_model(preset("0.6B"), device, torch.bfloat16), compile=True)
    start = time.perf_counter()
    engine.warmup(batch, 32, 256)
    print(f"warm-up {time.perf_counter() - start:.1f} s", flush=True)
    prompts = [[1] * 32] * batch
    for _ in range(2):
        start = time.perf_counter()
        list(engine.tokens(prompts, 256, SamplingParams(), pad_id=0))
        print(f"256 tokens: {(time.perf_counter() - start) * 1e3 / 256:.3f} ms per token, prefill included", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        list(engine.tokens(prompts, 65, SamplingParams(), pad_id=0))
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
