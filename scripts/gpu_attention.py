"""Decode attention of one layer, Qwen3-0.6B heads, bf16: with the new_token kernel (qwen3gen/kernels.py: q/k norm,
rotation, cache writes) against the model's own lines, compiled, by batch and slots read.

Each case is 28 layers (28 distinct modules, so their weights do not sit in the L2 cache), recorded as one CUDA
graph and replayed. Usage (on the GPU machine): python3 scripts/gpu_attention.py
"""

from __future__ import annotations

import torch

from qwen3gen import kernels, preset
from qwen3gen.model import Attention, KVCache, attention_mask, rotary_angles

LAYERS = 28


def graph_us(fn) -> float:
    """Microseconds per layer of fn (which runs all LAYERS layers), replayed from one CUDA graph."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / LAYERS


def setup(batch: int, key_length: int):
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = preset("0.6B")
    layers = []
    for _ in range(LAYERS):
        attn = Attention(cfg).to(device, dtype).requires_grad_(False)
        attn.kv_cache = KVCache(batch, key_length + 64, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        attn.kv_cache.k.normal_()
        attn.kv_cache.v.normal_()
        layers.append(attn)
    slots = torch.tensor([key_length - 1], device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)
    rope = rotary_angles(slots[None, :].expand(batch, 1), cfg.head_dim, cfg.rope_theta, dtype)
    mask = attention_mask(slots, key_length, pad, dtype)
    x = torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dtype)
    return layers, x, rope, mask, slots


def main() -> None:
    print("Attention layer (q/k/v product to o_proj), compiled without tuning (cuBLAS products), us per layer:")
    print("| batch | slots read | model lines | new_token kernel | max |diff| |")
    print("|---:|---:|---:|---:|---:|")
    for batch in (1, 64):
        for key_length in (64, 320, 1024):
            layers, x, rope, mask, slots = setup(batch, key_length)
            times, outs = [], []
            for fused in (False, True):
                kernels.available = lambda device, fused=fused: fused
                torch._dynamo.reset()
                compiled = [torch.compile(a, fullgraph=True, dynamic=False) for a in layers]
                with torch.no_grad():
                    outs.append(compiled[0](x, rope, mask, slots))
                    times.append(graph_us(lambda: [c(x, rope, mask, slots) for c in compiled]))
            diff = (outs[0].float() - outs[1].float()).abs().max().item()
            print(f"| {batch} | {key_length} | {times[0]:.2f} | {times[1]:.2f} | {diff:.3f} |", flush=True)



if __name__ == "__main__":
    main()
