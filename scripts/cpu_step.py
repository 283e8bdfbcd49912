"""The batch-1 decode step of the full 0.6B shape on this CPU: step time, and the share of PyTorch's products in it.

Usage: python scripts/cpu_step.py [OPTIONS]   OPTIONS joined by +: compiled (torch.compile the blocks), int8 (weight-only
int8), nokernel (PyTorch's products instead of cpu_matvec.c), smallpages (weights left where PyTorch put them, not moved
to 2 MiB pages). Run each option set in its own process and more than once: this machine's memory bandwidth varies
run to run.
"""

from __future__ import annotations

import sys
import time

import torch

from qwen3gen import cpu_kernels, preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.quantize import quantize


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
    engine.warmup(1, 32, 64)
    warmup = time.perf_counter() - start
    if model.cache_shape[1] < 128:  # an eager engine's cache fits its last request only
        model.setup_cache(1, 128)
    ids, pad = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    rows = []
    with torch.inference_mode():
        for i in range(3):
            engine.step(ids, torch.tensor([40 + i]), pad, 64)
        for _ in range(3):
            with torch.profiler.profile() as prof:
                start = time.perf_counter()
                for i in range(8):
                    engine.step(ids, torch.tensor([40 + i]), pad, 64)
                step = (time.perf_counter() - start) / 8 * 1e3
            names = ("aten::mm", "aten::_weight_int8pack_mm", "qwen3gen::cpu_matvec")
            products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in names) / 8 / 1e3
            rows.append(f"step {step:.1f} ms = products {products:.1f} + rest {step - products:.1f}")
    print(f"{options or 'default'}: warm-up {warmup:.1f} s; " + "; ".join(rows), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
