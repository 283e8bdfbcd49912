"""The compiled batch-1 decode step on this CPU, split into matrix products and the rest, under inductor options.

Usage: python scripts/cpu_step.py [OPTIONS]   OPTIONS joined by +: cppwrapper (inductor's C++ wrapper), noasserts (no
size asserts in the wrapper), skipguards (dynamo's guards skipped after warm-up). Run each option set in its own
process (inductor's settings are global) and more than once: this machine's memory bandwidth varies run to run.
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from qwen3gen import preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine


def main(options: str = "") -> None:
    parts = set(options.split("+"))
    torch._inductor.config.cpp_wrapper = "cppwrapper" in parts
    torch._inductor.config.size_asserts = "noasserts" not in parts
    torch.manual_seed(0)
    engine = Engine(random_model(preset("0.6B"), torch.device("cpu"), torch.bfloat16), compile=True)
    start = time.perf_counter()
    engine.warmup(1, 32, 64)
    warmup = time.perf_counter() - start
    ids, pad = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if "skipguards" in parts else contextlib.nullcontext()
    rows = []
    with torch.inference_mode(), stance:
        for i in range(3):
            engine.step(ids, torch.tensor([40 + i]), pad, 64)
        for _ in range(3):
            with torch.profiler.profile() as prof:
                start = time.perf_counter()
                for i in range(8):
                    engine.step(ids, torch.tensor([40 + i]), pad, 64)
                step = (time.perf_counter() - start) / 8 * 1e3
            mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") / 8 / 1e3
            rows.append(f"step {step:.1f} ms = products {mm:.1f} + rest {step - mm:.1f}")
    # With the C++ wrapper the products are called from C++, out of the profiler's sight: only the step time counts.
    print(f"{options or 'default'}: warm-up {warmup:.1f} s (caches as found); " + "; ".join(rows), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
