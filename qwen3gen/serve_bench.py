"""`qwen3gen bench --serve`: the server under load over HTTP, against the offline engine on the same requests.

The server (uvicorn in a thread) runs in this process, its engine in a process of its own (as `qwen3gen serve` runs
them); the clients run in up to CLIENT_PROCESSES processes of their own, as asyncio tasks over httpx, each request
streamed with its own max_tokens and EOS ignored. Two workloads: the offline throughput workload (bench --throughput's
requests, all sent at once), and a latency workload at several concurrencies (each client sends its next request when
its last one ends). Per row: output tokens/s over HTTP and in the offline engine (same requests, as many running at
once), their ratio, and time to first token and inter-token latency percentiles as the clients saw them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import multiprocessing
import multiprocessing.pool
import statistics
import time
from dataclasses import dataclass

import torch

from .bench import (
    device_name, free_memory, load_bench_model, qwen3gen_throughput, resident_kv_bytes, throughput_defaults,
    throughput_workload, warm_up, warmup_workload,
)
from .engine import Engine
from .engine.engine import default_limits
from .engine.kv_pool import default_kv_memory
from .errors import InvalidParameterError
from .llm import LLM
from .loaders.checkpoint import default_dtype, parse_device, parse_dtype
from .tokenizer import Tokenizer

MODEL_NAME = "bench"
CLIENT_PROCESSES = 4  # the clients' parsing, spread so that they are not what the benchmark measures


@dataclass
class ServeRow:
    workload: str
    concurrency: int
    requests: int
    output_tokens: int
    http_tokens_per_s: float
    offline_tokens_per_s: float
    vs_offline: float
    ttft_ms: tuple[float, float, float]  # p50, p90, p99
    itl_ms: tuple[float, float, float]


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    if len(values) == 1:
        return (values[0],) * 3
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


async def _one(client, url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int]:  # noqa: ANN001
    """One streamed request: (time to its first token, the gaps between its token chunks, tokens received)."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):  # tokens (the last one with the finish reason; several when the server lags)
                times.append(time.perf_counter())
    return times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens


def drive(url: str, prompts: list[list[int]], lengths: list[int], concurrency: int) -> tuple[float, list, int]:
    """Run in the client process: every request, at most `concurrency` at a time. (wall s, per-request results,
    output tokens)."""
    import httpx

    async def main() -> tuple[float, list, int]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            queue = list(zip(prompts, lengths))[::-1]
            results = []

            async def worker() -> None:
                while queue:
                    prompt, n = queue.pop()
                    results.append(await _one(client, url, prompt, n))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
            wall = time.perf_counter() - start
        return wall, results, sum(r[2] for r in results)

    return asyncio.run(main())


def latency_defaults(device: torch.device) -> dict:
    """The latency workloads: prompts over a range at each concurrency, then prompts of one short length alone (the
    case of issue 16's inter-token latency and TTFT goals: 128 tokens on a GPU)."""
    if device.type == "cuda":
        return dict(concurrencies=(1, 16, 64), prompt_range=(128, 1024), output_tokens=128, short_prompt=128)
    return dict(concurrencies=(1, 2, 4), prompt_range=(16, 64), output_tokens=16, short_prompt=16)


def bench_llm(
    model_name: str | None, preset_name: str, dev: torch.device, dt: torch.dtype, tokenizer_dir: str | None,
    **options: object,
) -> LLM:  # fmt: skip
    """The server's LLM, built in its engine process: the checkpoint's, or the same random weights as the offline
    engine's."""
    model, checkpoint_dir = load_bench_model(model_name, preset_name, dev, dt)
    return LLM(model, Tokenizer.from_dir(checkpoint_dir or tokenizer_dir), {}, **options)


def drive_all(
    clients: multiprocessing.pool.Pool, url: str, prompts: list[list[int]], lengths: list[int], concurrency: int
) -> tuple[float, list, int]:  # fmt: skip
    """The requests spread over the client processes, each with its share of the concurrency, started together.
    (wall s, per-request results, output tokens)."""
    count = min(CLIENT_PROCESSES, concurrency, len(prompts))
    jobs = [clients.apply_async(drive, (url, prompts[i::count], lengths[i::count], len(range(i, concurrency, count))))
            for i in range(count)]  # fmt: skip
    done = [job.get() for job in jobs]
    return max(d[0] for d in done), [r for d in done for r in d[1]], sum(d[2] for d in done)


def run_serve_bench(
    model_name: str | None = None,
    tokenizer_dir: str | None = None,
    preset_name: str = "0.6B",
    device: str | None = None,
    dtype: str | None = None,
    requests: int | None = None,
    compile: bool = False,
    seed: int = 0,
    on_row=None,  # noqa: ANN001
) -> tuple[dict, list[ServeRow]]:
    """Both workloads over HTTP and offline; on_row(setup, row) sees each row as it is measured."""
    from .server import EngineProcess, create_app
    from .server.thread import ServerThread

    if model_name is None and tokenizer_dir is None:
        raise InvalidParameterError("bench --serve with random weights needs --tokenizer DIR (the server needs one).")
    dev = parse_device(device)
    dt = parse_dtype(dtype) or default_dtype(dev)
    model, checkpoint_dir = load_bench_model(model_name, preset_name, dev, dt)
    cfg = model.config
    throughput = throughput_defaults(dev)
    latency = latency_defaults(dev)
    running, _ = default_limits(dev)
    workloads = [("throughput", running, *throughput_workload(
        requests or throughput["requests"], (throughput["min_prompt_tokens"], throughput["max_prompt_tokens"]),
        (throughput["min_output_tokens"], throughput["max_output_tokens"]), cfg.vocab_size, seed,
    ))]  # fmt: skip
    for c in latency["concurrencies"]:
        count = requests or max(4, 2 * c)
        prompts, _ = throughput_workload(count, latency["prompt_range"], (1, 1), cfg.vocab_size, seed + c)
        workloads.append(("latency", c, prompts, [latency["output_tokens"]] * len(prompts)))
    short = latency["short_prompt"]
    prompts, _ = throughput_workload(requests or 4, (short, short), (1, 1), cfg.vocab_size, seed)
    workloads.append((f"latency, {short}-token prompts", 1, prompts, [latency["output_tokens"]] * len(prompts)))
    setup = {"device": device_name(dev), "dtype": str(dt).removeprefix("torch."),
             "model": checkpoint_dir or f"random weights, Qwen3-{preset_name} shape", "compile": compile,
             "torch": torch.__version__}  # fmt: skip
    rows: list[ServeRow] = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(CLIENT_PROCESSES) as clients:
        for job in [clients.apply_async(percentiles, ([1.0],)) for _ in range(CLIENT_PROCESSES)]:
            job.get()  # the clients' imports done before anything is timed
        for name, concurrency, prompts, lengths in workloads:
            warmup = warmup_workload(dev, min(concurrency, len(prompts)), cfg.vocab_size, seed + 1)
            free_memory(dev)
            kv_memory = min(resident_kv_bytes(cfg, prompts, lengths, dt), default_kv_memory(dev))  # one for both
            offline = Engine(model, kv_memory=kv_memory, max_running=concurrency, compile=compile)
            warm_up(offline, warmup)
            wall, produced = qwen3gen_throughput(offline, prompts, lengths)
            offline_rate = produced / wall
            offline = None
            free_memory(dev)
            options = dict(compile=compile, max_running=concurrency, kv_memory=kv_memory)
            build = functools.partial(bench_llm, model_name, preset_name, dev, dt, tokenizer_dir, **options)
            engine = EngineProcess(build)
            try:
                server = ServerThread(create_app(engine, MODEL_NAME))
                try:
                    url = server.url + "/v1/completions"
                    drive_all(clients, url, *warmup, concurrency)  # connections, and the graphs of every batch size
                    engine.reset_prefix_cache()
                    http_wall, results, tokens = drive_all(clients, url, prompts, lengths, concurrency)
                finally:
                    server.stop()
            finally:
                engine.stop()  # ended with the server already, unless the server did not start
            ttft = percentiles([r[0] * 1e3 for r in results])
            itl = percentiles([g * 1e3 for r in results for g in r[1]])
            rate = tokens / http_wall
            row = ServeRow(name, concurrency, len(prompts), tokens, rate, offline_rate, rate / offline_rate, ttft, itl)
            rows.append(row)
            if on_row:
                on_row(setup, row)
    free_memory(dev)
    return setup, rows


SERVE_TABLE_HEAD = (
    "| workload | concurrency | requests | output tokens | HTTP tok/s | offline tok/s | x offline | TTFT ms p50/p90/p99 "
    "| ITL ms p50/p90/p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_serve_setup(setup: dict) -> str:
    return " | ".join(f"{k}: {v}" for k, v in setup.items())


def format_serve_row(r: ServeRow) -> str:
    three = lambda values: " / ".join(f"{v:.1f}" for v in values)  # noqa: E731
    return (f"| {r.workload} | {r.concurrency} | {r.requests} | {r.output_tokens} | {r.http_tokens_per_s:.1f} | "
            f"{r.offline_tokens_per_s:.1f} | {r.vs_offline:.2f} | {three(r.ttft_ms)} | {three(r.itl_ms)} |")  # fmt: skip

