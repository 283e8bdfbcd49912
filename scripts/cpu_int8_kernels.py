"""Matrix-vector read speed on this CPU: cpu_kernels.c (the engine's CPU kernel) against the paths PyTorch offers, in
float32, bf16 and int8.

40 distinct 6144x1024 matrices of each type, read once each in turn, so the CPU cache does not hold them; every
matrix lives in 2 MiB pages (cpu_kernels.huge_page_weights), as the engine's weights do, unless `smallpages` is given.
Usage: python scripts/cpu_int8_kernels.py [smallpages]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from qwen3gen import cpu_kernels

ROWS, COLS, MATRICES = 6144, 1024, 40


def read_speed(fn, count: int, bytes_each: int, reps: int = 5) -> float:
    """GB/s of weights read: fn(i) multiplies by matrix i."""
    for i in range(count):
        fn(i)
    start = time.perf_counter()
    for _ in range(reps):
        for i in range(count):
            fn(i)
    return bytes_each * count * reps / (time.perf_counter() - start) / 1e9


def main(options: str = "") -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, COLS, dtype=torch.bfloat16)
    weights = nn.Module()  # buffers, so that huge_page_weights moves them
    makers = {
        "int8": (MATRICES, lambda: torch.randint(-127, 128, (ROWS, COLS), dtype=torch.int8)),
        "scales": (MATRICES, lambda: torch.rand(ROWS, dtype=torch.bfloat16) * 0.01),
        "bf16": (MATRICES, lambda: torch.randn(ROWS, COLS, dtype=torch.bfloat16)),
        "f32": (MATRICES // 2, lambda: torch.randn(ROWS, COLS)),
    }
    for kind, (count, make) in makers.items():
        for i in range(count):
            weights.register_buffer(f"{kind}{i}", make())
    if options != "smallpages":
        cpu_kernels.huge_page_weights(weights)
    int8, scales, bf16, f32 = ([getattr(weights, f"{kind}{i}") for i in range(count)] for kind, (count, _) in makers.items())
    x32 = x.float()
    kernel = cpu_kernels.matvec
    rows = {
        "float32 F.linear": (lambda i: F.linear(x32, f32[i]), len(f32), 4),
        "float32 cpu_kernels.c": (lambda i: kernel(x32, f32[i], None, None, None, 0.0, None, False), len(f32), 4),
        "bf16 F.linear": (lambda i: F.linear(x, bf16[i]), MATRICES, 2),
        "bf16 cpu_kernels.c": (lambda i: kernel(x, bf16[i], None, None, None, 0.0, None, False), MATRICES, 2),
        "int8 torch._weight_int8pack_mm": (lambda i: torch._weight_int8pack_mm(x[0], int8[i], scales[i]), MATRICES, 1),
        "int8 cpu_kernels.c": (lambda i: kernel(x, int8[i], scales[i], None, None, 0.0, None, False), MATRICES, 1),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'4 KiB' if options else '2 MiB'} pages")
    for name, (fn, count, size) in rows.items():
        print(f"{name:32s} {read_speed(fn, count, size * ROWS * COLS):6.2f} GB/s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
