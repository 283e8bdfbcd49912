"""The batch-1 decode step of the full 0.6B shape on this CPU, timed without a profiler (its hooks cost more than
some of the kernels they would time).

Usage: python scripts/cpu_step.py [OPTIONS]   OPTIONS joined by +: compiled (a compiled engine: with cpu_kernels its
decode steps still run eagerly), int8 (weight-only int8), nokernel (the PyTorch lines instead of cpu_kernels.c),
smallpages (weights left where PyTorch put them, not moved to 2 MiB pages). Run each option set in its own process and
more than once: this machine's memory bandwidth varies run to run.
"""

from __future__ import annotations

import sys
import time

import torch

from qwen3gen import cpu_kernels, preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.quantize import quantize

KEYS = 256  # attention slots: about where the bench's 32 + 256-token request spends its steps


def main(options: str = "") -> None:
    parts = set(options.split("+"))
    if "nokernel" in parts:
        cpu_kernels.available = lambda device: False
    if "smallpages" in parts:
        cpu_kernels.huge_page_weights = lambda model: None
    torch.manual_seed(0)
    model = random_model(preset("0.6B"), torch.device("cpu"), torch.bfloat16)
    if "int8" in parts:
        quantize(model, "int8")
    engine = Engine(model, compile="compiled" in parts)
    start = time.perf_counter()
    engine.warmup(1, 32, KEYS)
    warmup = time.perf_counter() - start
    engine.ensure_cache(1, KEYS)  # an eager engine's cache fits its last request only
    ids, pad = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for i in range(3):
            engine.step(ids, torch.tensor([KEYS - 20 + i]), pad, KEYS)
        for _ in range(3):
            start = time.perf_counter()
            for i in range(8):
                engine.step(ids, torch.tensor([KEYS - 16 + i]), pad, KEYS)
            times.append((time.perf_counter() - start) / 8 * 1e3)
    print(f"{options or 'default'}: warm-up {warmup:.1f} s; step over {KEYS} slots: " + ", ".join(f"{t:.1f}" for t in times) + " ms")


if __name__ == "__main__":
    main(*sys.argv[1:])
