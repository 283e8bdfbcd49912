"""The compiled decode step under different inductor settings, with its kernels per step; matrix-vector products alone.

Usage (on the GPU machine): python3 scripts/gpu_variants.py micro [down]
                            python3 scripts/gpu_variants.py triton
                            python3 scripts/gpu_variants.py engine VARIANT [BATCH] [DEVICE]
VARIANT is base (the engine as it is), or settings joined by +: nofused (none of kernels.py's kernels), nomatvec
(kernels.py's attention kernels, but the blocks' own lines around them, compiled), sdpa (SDPA instead of
kernels.decode_attention), nocdt, nopdl, combo (inductor's combo kernels),
prefetchsplit, prefetchnext (weights read into the L2 cache on a side stream ahead of the layer that uses them),
cdtwide (coordinate-descent tuning in every direction, radius 2), aggressive (inductor fuses kernels that share no
input). DEVICE cpu is a 2-layer dry run.
Each engine variant runs in its own process: inductor's settings are global.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from qwen3gen import kernels, preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.model import Block, RMSNorm
from qwen3gen.sampling import SamplingParams

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}


def graph_time(fn, *args, reps: int = 200) -> float:
    """Microseconds per call of fn, its calls recorded back to back in one CUDA graph (no launch gaps)."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def show(name: str, n: int, k: int, label: str, us: float) -> None:
    """One product's time per call and the weight bytes read per second."""
    print(f"{name:8s} {n}x{k}: {label:32s} {us:6.2f} us  {n * k * 2 / 1e6 / us:5.2f} TB/s", flush=True)


def micro(only: str = "") -> None:
    """Each product as its own kernel, 28 weights of each shape in turn (as in the model: no weight stays in the
    60 MB L2 cache). Each compiled function takes one weight, so inductor cannot fuse the 28 products into one
    kernel, which the first version of this script allowed (all 28 shared one input).
    `micro down`: only the down product, with the SwiGLU product of gate and up fused in front of it or not."""
    device = torch.device("cuda")
    for name, (n, k) in SHAPES.items():
        if only and name != only:
            continue
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(28)]
        x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
        norm = RMSNorm(k, 1e-6).to(device, torch.bfloat16)

        def report(label: str, product, x=x) -> None:
            show(name, n, k, label, graph_time(lambda x: [product(x, w) for w in weights], x, reps=10) / 28)

        if name == "down":
            torch._inductor.config.coordinate_descent_tuning = True
            gate_up = torch.randn(1, 1, 2 * k, device=device, dtype=torch.bfloat16)
            swiglu = torch.compile(lambda h, w: F.linear(F.silu(h[..., :k]) * h[..., k:], w), fullgraph=True, dynamic=False)
            report("compiled SwiGLU+linear (fused)", swiglu, gate_up)
            plain = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, dynamic=False)
            product = torch.compile(lambda h: F.silu(h[..., :k]) * h[..., k:], fullgraph=True, dynamic=False)
            report("SwiGLU kernel, then linear kernel", lambda h, w: plain(product(h), w), gate_up)
            if only:
                continue
        report("cuBLAS F.linear", F.linear)
        report("cuBLAS norm+F.linear (eager)", lambda x, w: F.linear(norm(x), w))
        for cdt in (True, False):
            torch._inductor.config.coordinate_descent_tuning = cdt
            torch._dynamo.reset()
            report(f"compiled linear, cdt={cdt}", torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, dynamic=False))
            torch._dynamo.reset()
            report(f"compiled norm+linear, cdt={cdt}", torch.compile(lambda x, w: F.linear(norm(x), w), fullgraph=True, dynamic=False))


def micro_triton() -> None:
    """A plain Triton matrix-vector kernel over a grid of launch settings, timed as `micro` times inductor's: how fast
    can one kernel per product be, with the best settings found by an exhaustive search rather than inductor's
    coordinate descent (whose picks vary from one cold compile to the next)?"""
    import itertools

    import triton
    import triton.language as tl

    @triton.jit
    def gemv(w_ptr, x_ptr, y_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVICT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in tl.range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            if EVICT:
                w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first")
            else:
                w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
            acc += w.to(tl.float32) * tl.load(x_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(tl.bfloat16))

    device = torch.device("cuda")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(28)]
        x = torch.randn(k, device=device, dtype=torch.bfloat16)
        y = torch.empty(n, device=device, dtype=torch.bfloat16)
        torch._inductor.config.coordinate_descent_tuning = True
        inductor = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True, dynamic=False)
        show(name, n, k, "inductor, coordinate descent", graph_time(lambda x: [inductor(x[None], w) for w in weights], x, reps=10) / 28)

        def timed(block_n: int, block_k: int, warps: int, stages: int, evict: int) -> float | None:
            def product(x, w):
                gemv[(n // block_n,)](w, x, y, k, block_n, block_k, evict, num_warps=warps, num_stages=stages)

            product(x, weights[0])
            if not torch.allclose(y.float(), weights[0].float() @ x.float(), atol=2e-2, rtol=2e-2):
                print(f"{name}: wrong result with {block_n, block_k, warps, stages, evict}", flush=True)
                return None
            return graph_time(lambda x: [product(x, w) for w in weights], x, reps=10) / 28

        results = []
        for setting in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8), (1, 3), (0,)):
            if setting[1] <= k and setting[0] * setting[1] <= 8192 and (us := timed(*setting)) is not None:
                results.append((us, *setting))
        results.sort()
        best = results[0][1:5]
        if (us := timed(*best, 1)) is not None:
            results.append((us, *best, 1))
            results.sort()
        for us, *setting in results[:4]:  # setting: BLOCK_N, BLOCK_K, warps, stages, evict_first
            show(name, n, k, f"Triton {tuple(setting)}", us)
        print(f"{name:8s} {n}x{k}: {len(results)} settings, median {results[len(results) // 2][0]:.2f} us", flush=True)


def add_prefetch(model, scheme: str) -> None:
    """Before each layer, queue on a side stream reads of weights that later products use: the side stream brings
    them from memory into the L2 cache while the layer's small kernels leave memory bandwidth idle.
    scheme "split": at layer i, its MLP weights, then layer i+1's attention weights (about 44 MB live in L2 at once).
    scheme "next": at layer i, all of layer i+1's weights."""
    side = torch.cuda.Stream()
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        ahead = [layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight] if scheme == "split" else []
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            ahead += [nxt.self_attn.qkv_proj.weight, nxt.self_attn.o_proj.weight]
            if scheme == "next":
                ahead += [nxt.mlp.gate_up_proj.weight, nxt.mlp.down_proj.weight]

        def call(*args, _inner=layer._compiled_call_impl, _ahead=ahead, _last=i + 1 == len(layers), **kwargs):
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for weight in _ahead:
                    weight.sum()
            out = _inner(*args, **kwargs)
            if _last:
                main.wait_stream(side)
            return out

        layer._compiled_call_impl = call


def engine(variant: str, batch_size: str = "1", device_name: str = "cuda") -> None:
    batch, device = int(batch_size), torch.device(device_name)
    parts = set(variant.split("+"))
    model = random_model(preset("0.6B") if device.type == "cuda" else preset("0.6B").replace(num_hidden_layers=2), device, torch.bfloat16)
    engine = Engine(model, compile=True)
    config = torch._inductor.config
    if "nofused" in parts:
        kernels.available = lambda device: False
    if "sdpa" in parts:
        kernels.ATTENTION_MAX_KEYS = 0
    if "nomatvec" in parts:
        def unfused(block, x, rope, mask, slots):
            x = x + block.self_attn(block.input_layernorm(x), rope, mask, slots)
            return x + block.mlp(block.post_attention_layernorm(x))

        Block.decode_one_token = unfused
    if "nocdt" in parts:
        config.coordinate_descent_tuning = False
    if "nopdl" in parts:
        config.triton.enable_pdl = False
    if "combo" in parts:
        config.combo_kernels = True
    if "aggressive" in parts:
        config.aggressive_fusion = True
    if "cdtwide" in parts:
        config.coordinate_descent_check_all_directions = True
        config.coordinate_descent_search_radius = 2
    for scheme in ("split", "next"):
        if f"prefetch{scheme}" in parts and device.type == "cuda":
            add_prefetch(model, scheme)
    start = time.perf_counter()
    engine.warmup(batch, 32, 256)
    print(f"{variant}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    prompts = [[1] * 32] * batch
    rates = []
    for _ in range(3):
        chunks = engine.tokens(prompts, 256, SamplingParams(), pad_id=0)
        first = next(chunks)
        start = time.perf_counter()
        rest = list(chunks)
        rates.append(sum(c.shape[1] for c in rest) * batch / (time.perf_counter() - start))
    print(f"{variant}: decode {statistics.median(rates):.1f} tok/s (runs {[round(r) for r in rates]}); first tokens {torch.cat([first, *rest], 1)[0, :12].tolist()}", flush=True)
    if device.type != "cuda":
        return
    if hasattr(kernels, "_matvec_tuned"):
        chosen = {key[:4]: str(config) for key, config in kernels._matvec_tuned.cache.items()}
        print(f"{variant}: matvec settings chosen (N, K, norm, swiglu): {chosen}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        list(engine.tokens(prompts, 65, SamplingParams(), pad_id=0))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"{variant}: GPU time per step {total / 64:.1f} us (64 decode steps + prefill); kernels per step {sum(e.count for e in events) / 64:.1f}")
    for e in events[:40]:
        print(f"  {e.count / 64:6.1f}/step {e.self_device_time_total / max(e.count, 1):7.2f} us  {e.key[:90]}")


if __name__ == "__main__":
    {"micro": micro, "triton": micro_triton, "engine": engine}[sys.argv[1]](*sys.argv[2:])
