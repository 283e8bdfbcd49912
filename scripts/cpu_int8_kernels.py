"""Matrix-vector read speed of the int8 paths PyTorch offers on this CPU, against bf16 `F.linear` and an inductor-generated bf16 reduction.

40 distinct 6144x1024 matrices, read once each in turn, so the CPU cache does not hold them. Usage: python scripts/cpu_int8_kernels.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

ROWS, COLS, MATRICES = 6144, 1024, 40


def read_speed(fn, weights: list, bytes_each: int, reps: int = 5) -> float:
    """GB/s of weights read: fn(i) multiplies by matrix i."""
    for i in range(len(weights)):
        fn(i)
    start = time.perf_counter()
    for _ in range(reps):
        for i in range(len(weights)):
            fn(i)
    return bytes_each * len(weights) * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, COLS, dtype=torch.bfloat16)
    int8 = [torch.randint(-127, 128, (ROWS, COLS), dtype=torch.int8) for _ in range(MATRICES)]
    scales = [torch.rand(ROWS, dtype=torch.bfloat16) * 0.01 for _ in range(MATRICES)]
    bf16 = [torch.randn(ROWS, COLS, dtype=torch.bfloat16) for _ in range(MATRICES // 2)]
    dequant = torch.compile(lambda x, w, s: F.linear(x, w.to(torch.bfloat16)) * s, mode="max-autotune-no-cudagraphs")
    reduction = torch.compile(lambda x, w: (x.float() * w.float()).sum(-1).to(torch.bfloat16), fullgraph=True, dynamic=False)
    channel = torch.zeros(ROWS, dtype=torch.long)
    packed = [
        torch.ops.quantized.linear_prepack(torch.quantize_per_channel(w.float(), s.float(), channel, 0, torch.qint8), None)
        for w, s in zip(int8, scales)
    ]
    rows = {
        "torch._weight_int8pack_mm": (lambda i: torch._weight_int8pack_mm(x, int8[i], scales[i]), int8, ROWS * COLS),
        "compiled dequantize + F.linear, max-autotune": (lambda i: dequant(x, int8[i], scales[i]), int8, ROWS * COLS),
        "fbgemm quantized::linear_dynamic (int8 activations too)": (lambda i: torch.ops.quantized.linear_dynamic(x.float(), packed[i]), int8, ROWS * COLS),
        "bf16 F.linear": (lambda i: F.linear(x, bf16[i]), bf16, 2 * ROWS * COLS),
        "bf16 compiled reduction (x * W).sum(-1)": (lambda i: reduction(x, bf16[i]), bf16, 2 * ROWS * COLS),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (fn, weights, size) in rows.items():
        print(f"{name:58s} {read_speed(fn, weights, size):6.2f} GB/s", flush=True)


if __name__ == "__main__":
    main()
