"""`qwen3gen bench --model FILE.gguf`: qwen3gen against llama.cpp (through llama-cpp-python) on the same GGUF file.

Each engine runs in a process of its own, so that its load time and peak RSS are its own: the same random prompt
decoded greedily (EOS ignored) for the same number of tokens, then a long prompt prefilled to its first token; the
median of several runs after one warm-up run. The decode and prefill ratios are against llama.cpp's row.

    python -m qwen3gen.gguf_bench ENGINE FILE ...   # one engine's measurement, as JSON on the last line
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .choices import GGUF_ENGINES

LLAMA_CPP_INSTALL = (
    "pip install llama-cpp-python (it builds llama.cpp for this CPU; on a CPU with AMX, CMAKE_ARGS='-DGGML_NATIVE=OFF "
    "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON' builds "
    "it without the AMX path, whose batched prefill crashed here)"
)


@dataclass
class GGUFRow:
    engine: str
    load_s: float  # the engine's imports and load call (qwen3gen's imports torch)
    ready_s: float  # the child process launched to the engine loaded: interpreter start and imports included
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_rss_gb: float
    peak_rss_vs_file: float
    decode_vs_llama_cpp: float | None
    prefill_vs_llama_cpp: float | None
    same_tokens: int | None  # leading greedy tokens identical to the first row's (of the first 32)
    tokens: list[int]
    error: str | None = None


def prompts(vocab: int, prompt_tokens: int, prefill_tokens: int) -> tuple[list[int], list[int]]:
    """The decode prompt and the prefill prompt: random IDs below the special tokens, seed 0."""
    import random

    rng = random.Random(0)
    top = min(vocab, 151643) - 1
    return [rng.randint(0, top) for _ in range(prompt_tokens)], [rng.randint(0, top) for _ in range(prefill_tokens)]


def qwen3gen_engine(
    path: str, threads: int, kv_memory: int
) -> tuple[int, Callable[[list[int], int], tuple[float, float, list[int]]]]:
    """(vocabulary size, run(prompt, new tokens) -> (seconds to the first token, seconds for the rest, tokens)); a KV
    pool of kv_memory bytes, room for the runs' context as llama.cpp's n_ctx is (the default pool, of gigabytes, would
    count towards the RSS as the runs write fresh blocks of it)."""
    import torch

    import qwen3gen

    torch.set_num_threads(threads)
    llm = qwen3gen.load(path, device="cpu", dtype="bfloat16", kv_memory=kv_memory, block_size=BLOCK_SIZE)
    engine = llm.engine

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        engine.reset_prefix_cache()  # every run prefills its prompt
        start = time.perf_counter()
        request = engine.add_request(
            prompt, qwen3gen.SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        )
        tokens: list[int] = []
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id == request:
                    tokens += out.new_token_ids
            if first is None and tokens:
                first = time.perf_counter()
        return first - start, time.perf_counter() - first, tokens

    return llm.model.config.vocab_size, run


def llama_cpp_engine(
    path: str, threads: int, context: int
) -> tuple[int, Callable[[list[int], int], tuple[float, float, list[int]]]]:
    """llama.cpp's own loop: the prompt evaluated in batches (n_batch 512), then one token at a time, each the argmax
    of the last logits (its own sampler chain is not greedy by default)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False)
    vocab = llm.n_vocab()

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens: list[int] = []
        first = None
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)))))
            first = first or time.perf_counter()
            if len(tokens) < new_tokens:
                llm.eval(tokens[-1:])
        return first - start, time.perf_counter() - first, tokens

    return vocab, run


def measure(
    engine: str, path: str, prompt_tokens: int, new_tokens: int, prefill_tokens: int, reps: int, threads: int,
    kv_memory: int, launched: float,
) -> dict:  # fmt: skip
    """One engine's figures, in this process (launched: the wall-clock time its parent started it)."""
    start = time.perf_counter()
    if engine == "qwen3gen":
        vocab, run = qwen3gen_engine(path, threads, kv_memory)
    else:
        vocab, run = llama_cpp_engine(path, threads, context_tokens(prompt_tokens, new_tokens, prefill_tokens))
    loaded, ready = time.perf_counter(), time.time() - launched
    prompt, long_prompt = prompts(vocab, prompt_tokens, prefill_tokens)
    decode, prefill, tokens = [], [], []
    for rep in range(reps + 1):  # the first of each is a warm-up
        _, rest, tokens = run(prompt, new_tokens)
        first, _, _ = run(long_prompt, 1)
        if rep:
            decode.append((new_tokens - 1) / rest)
            prefill.append(prefill_tokens / first)
    return dict(
        engine=engine, load_s=loaded - start, ready_s=ready, decode_tokens_per_s=statistics.median(decode),
        prefill_tokens_per_s=statistics.median(prefill),
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # kB on Linux
        tokens=tokens,
    )  # fmt: skip


BLOCK_SIZE = 16  # qwen3gen's KV block size in the bench


def context_tokens(prompt_tokens: int, new_tokens: int, prefill_tokens: int) -> int:
    """The longest context of the runs, and a little room: llama.cpp's n_ctx, and qwen3gen's pool."""
    return max(prompt_tokens + new_tokens, prefill_tokens) + 16


def pool_bytes(path: str, context: int) -> int:
    """A bf16 KV pool with room for one request of `context` tokens (and the scratch block and one more)."""
    import torch

    from .engine.kv_pool import bytes_per_block
    from .loaders.gguf import GGUFCheckpoint

    config = GGUFCheckpoint.open(path).config
    return bytes_per_block(config, BLOCK_SIZE, torch.bfloat16) * (-(-context // BLOCK_SIZE) + 2)


def failed(engine: str, why: str) -> GGUFRow:
    return GGUFRow(engine, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, None, None, [], why)


def child_row(engine: str, path: str, options: list[str], timeout: float) -> GGUFRow:
    """Measure one engine in a child process; a crash or a missing package is the row's error, not the bench's."""
    if engine == "llama.cpp":
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return failed(engine, f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}")
    command = [sys.executable, "-m", "qwen3gen.gguf_bench", engine, path, *options, repr(time.time())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed(engine, f"did not finish in {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode < 0:
        return failed(engine, f"crashed ({signal.Signals(-done.returncode).name})")
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return failed(engine, f"exited with status {done.returncode}: {last}")
    figures = json.loads(lines[-1])
    return GGUFRow(
        **figures, peak_rss_vs_file=figures["peak_rss_gb"] * 1e9 / os.path.getsize(path), decode_vs_llama_cpp=None,
        prefill_vs_llama_cpp=None, same_tokens=None,
    )  # fmt: skip


def run_gguf_bench(
    path: str,
    engines: tuple[str, ...] = GGUF_ENGINES,
    prompt_tokens: int = 32,
    new_tokens: int = 128,
    prefill_tokens: int = 512,
    reps: int = 3,
    threads: int | None = None,
    timeout: float = 1800.0,
    on_row: Callable[[dict, GGUFRow], None] | None = None,
) -> tuple[dict, list[GGUFRow]]:
    """Every engine in turn, llama.cpp first (the ratios' baseline, its tokens the reference)."""
    if not os.path.isfile(path):
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(f"no GGUF file at {path}.")
    threads = threads or len(os.sched_getaffinity(0))
    kv_memory = pool_bytes(path, context_tokens(prompt_tokens, new_tokens, prefill_tokens))  # (a bad file stops here)
    options = [str(v) for v in (prompt_tokens, new_tokens, prefill_tokens, reps, threads, kv_memory)]
    setup = dict(
        model=path, file_gb=os.path.getsize(path) / 1e9, threads=threads, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, prefill_tokens=prefill_tokens, reps=reps, kv_pool_mib=kv_memory / 2**20,
    )  # fmt: skip
    rows: list[GGUFRow] = []
    for engine in sorted(engines, key=GGUF_ENGINES.index):
        row = child_row(engine, path, options, timeout)
        baseline = next((r for r in rows if r.engine == "llama.cpp" and not r.error), None)
        if baseline and not row.error:
            row.decode_vs_llama_cpp = row.decode_tokens_per_s / baseline.decode_tokens_per_s
            row.prefill_vs_llama_cpp = row.prefill_tokens_per_s / baseline.prefill_tokens_per_s
        reference = next((r.tokens for r in rows if not r.error), None)
        if reference is not None and not row.error:
            pairs = list(zip(row.tokens[:32], reference[:32]))
            row.same_tokens = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        rows.append(row)
        if on_row:
            on_row(setup, row)
    return setup, rows


GGUF_TABLE_HEAD = (
    "| engine | decode tok/s | x llama.cpp | prefill tok/s | x llama.cpp | load s | ready s (imports) | peak RSS GB "
    "| x file | same first-32 tokens |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_gguf_setup(setup: dict) -> str:
    return (
        f"{setup['model']} ({setup['file_gb']:.2f} GB) | {setup['threads']} threads | "
        f"prompt {setup['prompt_tokens']} + "
        f"{setup['new_tokens']} new tokens, greedy | prefill {setup['prefill_tokens']} | median of {setup['reps']} "
        f"| qwen3gen's KV pool {setup['kv_pool_mib']:.0f} MiB"
    )


def format_gguf_row(row: GGUFRow) -> str:
    if row.error:
        return f"| {row.engine} | {row.error} |"
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (
        f"| {row.engine} | {row.decode_tokens_per_s:.1f} | {ratio(row.decode_vs_llama_cpp)} "
        f"| {row.prefill_tokens_per_s:.0f} "
        f"| {ratio(row.prefill_vs_llama_cpp)} | {row.load_s:.2f} | {row.ready_s:.2f} | {row.peak_rss_gb:.2f} "
        f"| {row.peak_rss_vs_file:.2f} | {'-' if row.same_tokens is None else row.same_tokens} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="one engine's GGUF measurement (run by `qwen3gen bench`)")
    parser.add_argument("engine", choices=GGUF_ENGINES)
    parser.add_argument("path")
    for name in ("prompt_tokens", "new_tokens", "prefill_tokens", "reps", "threads", "kv_memory"):
        parser.add_argument(name, type=int)
    parser.add_argument("launched", type=float, help="the wall-clock time the parent started this process")
    args = parser.parse_args()
    from .errors import Qwen3GenError

    try:
        figures = measure(
            args.engine,
            args.path,
            args.prompt_tokens,
            args.new_tokens,
            args.prefill_tokens,
            args.reps,
            args.threads,
            args.kv_memory,
            args.launched,
        )
    except Qwen3GenError as error:  # the sentence is the row's error
        sys.exit(str(error))
    except Exception as error:  # noqa: BLE001 - llama.cpp's errors are whatever its binding raises
        sys.exit(f"{type(error).__name__}: {error}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
