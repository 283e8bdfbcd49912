"""Decode attention alone, Qwen3-0.6B heads, bf16: microseconds per layer by batch, slots read, and layout.

Each case is 28 calls recorded as one CUDA graph (as the decode step runs them) and replayed; the cache has
more slots than are read, as in the engine. Usage (on the GPU machine): python3 scripts/gpu_attention.py
"""

from __future__ import annotations

import torch

from qwen3gen.model import attention_mask, grouped_query_attention


def per_layer_us(batch: int, key_length: int, fold: bool, slots: int = 384, layers: int = 28) -> float:
    device = torch.device("cuda")
    q = torch.randn(batch, 16, 1, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, slots, 128, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    mask = attention_mask(torch.tensor([key_length - 1], device=device), key_length, pad, torch.bfloat16)
    for _ in range(3):
        grouped_query_attention(q, k, v, mask, fold)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            grouped_query_attention(q, k, v, mask, fold)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / layers


def main() -> None:
    print("| batch | slots read | enable_gqa us | folded us |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 64):
        for key_length in (64, 128, 256, 320):
            gqa, folded = per_layer_us(batch, key_length, False), per_layer_us(batch, key_length, True)
            print(f"| {batch} | {key_length} | {gqa:.1f} | {folded:.1f} |", flush=True)


if __name__ == "__main__":
    main()
