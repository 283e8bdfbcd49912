"""Where the throughput workload's time goes on a CUDA device (issue 14's 25,000 tokens/s goal): every step timed on
its own (steps synchronous), summed by kind with the bandwidth it reached, then the heaviest kernels of steps with
prefill chunks and of decode steps at the largest batch (torch.profiler).

`batch1` instead: where a batch-1 decode step's time goes (issue 14's 1,200 tokens/s goal): the engine's steps as the
bench runs them (overlapped), the decode graph's replays alone, and the share of a profiled window in which the GPU
was busy, with the kernels and copies outside the graph.

Run on the GPU machine from the repository root: python3 scripts/gpu_profile.py [batch1 | compiled] (`... cpu` or
`... batch1 cpu`: a dry run of the script on a 2-layer shape and 8 requests)
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qwen3gen  # noqa: E402
from qwen3gen import Engine, SamplingParams  # noqa: E402
from qwen3gen.bench import (  # noqa: E402
    qwen3gen_throughput, random_model, synchronize, throughput_workload, warm_up, warmup_workload,
    weight_bytes_per_step,
)
from qwen3gen.engine.kv_pool import bytes_per_block  # noqa: E402


def main(device: str = "cuda", compiled: bool = False) -> None:
    dev = torch.device(device)
    cfg = qwen3gen.preset("0.6B").replace(num_hidden_layers=28 if device == "cuda" else 2)
    requests = 256 if device == "cuda" else 8
    model = random_model(cfg, dev, torch.bfloat16)
    engine = Engine(model, overlap=False, compile=compiled)
    print(f"engine: {'compiled' if compiled else 'eager'}, steps synchronous")
    warm_up(engine, warmup_workload(dev, requests, cfg.vocab_size, 1))
    kv_token = bytes_per_block(cfg, 1, torch.bfloat16)
    weights = weight_bytes_per_step(model)
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])  # steps, seconds, bytes, tokens
    run = engine.runner.run

    def timed(rows, num_tokens, pending=None):  # noqa: ANN001, ANN202
        synchronize(dev)
        start = time.perf_counter()
        out = run(rows, num_tokens, pending)
        synchronize(dev)
        if max(num_tokens) == 1:
            size = next(s for s in engine.runner.graph_sizes if s >= len(rows))
            kind = f"decode, batch <= {size}"
        else:
            kind = f"prefill chunks, {next(s for s in engine.runner.prefill_sizes if s >= sum(num_tokens))} tokens"
        entry = kinds[kind]
        entry[0] += 1
        entry[1] += time.perf_counter() - start
        entry[2] += weights + kv_token * sum(r.num_computed + n for r, n in zip(rows, num_tokens))
        entry[3] += sum(num_tokens)
        return out

    engine.runner.run = timed
    prompts, lengths = throughput_workload(requests, (100, 1024), (100, 1024), cfg.vocab_size, 0)
    wall, produced = qwen3gen_throughput(engine, prompts, lengths)
    print(f"throughput workload, synchronous steps: {produced} tokens in {wall:.2f} s = {produced / wall:.0f} tok/s")
    print("| step kind | steps | s | ms/step | tokens | GB/s (weights + KV read) |\n|---|---:|---:|---:|---:|---:|")
    for kind, (steps, seconds, read, tokens) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        rate = read / seconds / 1e9
        print(f"| {kind} | {steps} | {seconds:.3f} | {1e3 * seconds / steps:.2f} | {tokens} | {rate:.0f} |")
    inside = sum(v[1] for v in kinds.values())
    print(f"outside runner.run (scheduling, sampling, outputs): {wall - inside:.2f} s of {wall:.2f}")

    engine.runner.run = run
    for prompt in prompts:
        engine.add_request(prompt[:1000], SamplingParams(max_new_tokens=40, ignore_eos=True))
    for title, steps in (("steps with prefill chunks (the first three)", 3), (f"decode steps, batch {requests}", 3)):
        if title.startswith("decode"):
            while engine.stats()["waiting"] or any(r.num_computed < r.prompt_len for r in engine.scheduler.running):
                engine.step()
        synchronize(dev)
        with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
            synchronize(dev)
        print(f"\n{title}:")
        order = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=order, row_limit=12, max_name_column_width=70))
    while engine.has_unfinished():
        engine.step()


def gpu_spans(prof: profile) -> list[tuple[float, float, str]]:
    """(start, end, name) of every kernel or copy of a profiled window, in µs, in order of start."""
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA")


def idle_before(prof: profile) -> list[tuple[str, tuple[int, float]]]:
    """The GPU's idle seconds before each kernel or copy, summed by its name: which work the GPU waited for (inside a
    graph, a launch gap; outside one, the host)."""
    spans = gpu_spans(prof)
    idle: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    end = spans[0][1] if spans else 0
    for start, stop, name in spans[1:]:
        entry = idle[name]
        entry[0] += 1
        entry[1] += max(0.0, start - end) / 1e6
        end = max(end, stop)
    return sorted(((k, (v[0], v[1])) for k, v in idle.items()), key=lambda kv: -kv[1][1])


def busy_share(prof: profile) -> tuple[float, float]:
    """(seconds the GPU ran something, seconds from the first to the last GPU event) in a profiled window."""
    spans = gpu_spans(prof)
    if not spans:
        return 0.0, 0.0
    span = (max(stop for _, stop, _ in spans) - spans[0][0]) / 1e6
    return span - sum(idle for _, (_, idle) in idle_before(prof)), span


def batch_one(device: str = "cuda") -> None:
    dev = torch.device(device)
    cfg = qwen3gen.preset("0.6B").replace(num_hidden_layers=28 if device == "cuda" else 2)
    engine = Engine(random_model(cfg, dev, torch.bfloat16))
    engine.warm_up()
    steps = 300 if device == "cuda" else 20
    for _ in range(2):  # the first pass warms up
        engine.add_request(list(range(100, 132)), SamplingParams(max_new_tokens=steps, ignore_eos=True))
        engine.step()  # the prefill
        synchronize(dev)
        start, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += sum(len(out.new_token_ids) for out in engine.step())
        synchronize(dev)
    wall = time.perf_counter() - start
    print(f"engine steps, batch 1: {produced} tokens in {wall * 1e3:.1f} ms = {produced / wall:.1f} tok/s")
    graph = engine.runner.graphs.get(1)
    if graph is not None:
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(steps):
            graph.recorded()
        synchronize(dev)
        print(f"graph replays alone: {(time.perf_counter() - start) / steps * 1e3:.3f} ms each")
    engine.add_request(list(range(100, 132)), SamplingParams(max_new_tokens=60, ignore_eos=True))
    for _ in range(20):
        engine.step()
    synchronize(dev)
    # The GPU's side only on CUDA: profiling the host's calls would slow the host, and make the GPU wait for it.
    activities = [ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(20):
            engine.step()
        synchronize(dev)
    busy, span = busy_share(prof)
    print(f"profiled 20 steps: GPU busy {busy * 1e3:.2f} ms of {span * 1e3:.2f} ms ({busy / max(span, 1e-9):.0%})")
    print("GPU idle time before each kind of GPU work (the 20 steps), largest first:")
    for name, (count, idle) in idle_before(prof)[:12]:
        print(f"  {idle * 1e3:8.3f} ms over {count:5d} (mean {idle / count * 1e6:6.2f} us)  {name[:90]}")
    order = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=order, row_limit=25, max_name_column_width=70))
    while engine.has_unfinished():
        engine.step()


if __name__ == "__main__":
    if sys.argv[1:2] == ["batch1"]:
        batch_one(*sys.argv[2:])
    else:
        words = sys.argv[1:]
        main(*[w for w in words if w != "compiled"], compiled="compiled" in words)
