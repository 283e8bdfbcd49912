"""`qwen3gen bench`: qwen3gen (eager, compiled) and transformers side by side, in one run, on one model.

run_bench (decode speed): every engine decodes the same random prompts greedily for the same number of tokens (EOS
ignored), with warm-up runs excluded and the median of several repetitions reported. Decoding is memory-bound, so
each row also shows the bandwidth it achieves (bytes read per decode step x steps per second) against
the device's copy bandwidth, measured in the same run.

run_throughput (offline throughput, nano-vllm's bench.py workload): many requests of random prompt and output
lengths, all submitted at once, EOS ignored; each engine's continuous batching runs them to the end, and the row is
the tokens over the wall time.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .choices import ENGINES, THROUGHPUT_ENGINES
from .config import Qwen3Config, preset
from .engine import Engine
from .engine.engine import default_limits
from .engine.kv_pool import bytes_per_block, default_kv_memory, parse_size
from .errors import InvalidParameterError
from .llm import load_shard
from .loaders.checkpoint import (
    Checkpoint, default_dtype, hf_name, load_model, parse_device, parse_dtype, resolve, unallocated_model,
)
from .loaders.quantize import quantize
from .model import Qwen3
from .results import peak_memory, reset_peak_memory
from .sampling import SamplingParams

# transformers first: its row is the baseline of every later row's ratio, and its tokens the reference.


@dataclass
class BenchRow:
    engine: str
    time_to_first_token_ms: float
    decode_tokens_per_s: float
    vs_transformers: float | None  # decode tokens/s over transformers' eager (dynamic cache) row
    bandwidth_gb_s: float
    bandwidth_share: float  # of the copy bandwidth measured in this run
    peak_memory_mib: float
    warmup_s: float  # the first (excluded) run, compilation included
    same_tokens: int | None  # leading greedy tokens identical to the first engine's (of the first 32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times)


def random_model(cfg: Qwen3Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Qwen3:
    """A model of the real shape with random weights: decoding speed does not depend on their values."""
    torch.manual_seed(seed)
    model = unallocated_model(cfg, dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def weight_bytes_per_step(model: Qwen3) -> int:
    """Bytes of weights one decode step reads: all of them (quantized weights and scales are buffers; the KV cache
    is the engine's pool, not the model's), except an embedding table only looked up row by row."""
    size = lambda tensors: {id(t): t.numel() * t.element_size() for t in tensors}  # noqa: E731
    total = sum(size([*model.parameters(), *model.buffers()]).values())
    embedding = size([*model.embed_tokens.parameters(), *model.embed_tokens.buffers()])
    head = embedding if model.lm_head is None else size([*model.lm_head.parameters(), *model.lm_head.buffers()])
    return total - sum(n for i, n in embedding.items() if i not in head)  # a tied head reads the embedding's tensors


def kv_bytes_per_step(cfg: Qwen3Config, batch: int, context: float, dtype: torch.dtype) -> float:
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return batch * per_token * context


def transformers_model(model: Qwen3, checkpoint_dir: str | None) -> torch.nn.Module:
    """The same weights in transformers' Qwen3ForCausalLM (a benchmark-only, optional dependency)."""
    import transformers

    weight = model.norm.weight  # the model's dtype and device
    if checkpoint_dir:
        return transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=weight.dtype).to(weight.device).eval()
    cfg = model.config
    hf_config = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_config).to(weight.dtype)
    hf.to_empty(device=weight.device)
    with torch.no_grad():
        hf.model.load_state_dict(dict(model.checkpoint_tensors()))
        hf.lm_head.weight.copy_(model.output_weight)
        hf.model.rotary_emb.inv_freq.copy_(1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    return hf.eval()


def load_bench_model(model_name: str | None, preset_name: str, dev: torch.device, dt: torch.dtype) -> tuple[Qwen3, str | None]:
    """(model, checkpoint directory): a checkpoint's weights, or random weights of a preset's shape."""
    checkpoint_dir = str(resolve(model_name)) if model_name else None
    if checkpoint_dir:
        return load_model(Checkpoint.open(checkpoint_dir), dev, dt), checkpoint_dir
    return random_model(preset(preset_name), dev, dt), None


def write_checkpoint(model: Qwen3, directory: Path) -> Path:
    """The model's weights as a Hugging Face checkpoint folder (config.json, a safetensors file per layer: no full
    copy on the host), which tensor-parallel ranks read their shards from."""
    cfg = model.config
    files: dict[str, dict[str, str]] = {}
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.checkpoint_tensors():
        groups.setdefault(name.split(".")[1] if name.startswith("layers.") else "rest", []).append((hf_name(name), tensor))
    for group, tensors in groups.items():
        file = f"model-{group}.safetensors"
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors}, directory / file)
        files.update({name: file for name, _ in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    config = {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "torch_dtype": str(model.norm.weight.dtype).removeprefix("torch."),
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def median_run(run: Callable[[], tuple[float, float, list[int]]], reps: int) -> tuple[float, float, float, list[int]]:
    """(warm-up seconds, median TTFT s, median decode seconds, tokens of row 0) over `reps` timed runs."""
    start = time.perf_counter()
    run()
    warmup = time.perf_counter() - start
    results = [run() for _ in range(reps)]
    return warmup, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[-1][2]


def qwen3gen_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Callable[[], tuple[float, float, list[int]]]:
    """All prompts added at once, EOS ignored: (time to the first token of the first request, the rest, its tokens)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def run() -> tuple[float, float, list[int]]:
        engine.reset_prefix_cache()  # every run prefills its prompts, as transformers' runs do
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            if first is None and tokens[ids[0]]:  # with overlapped steps, a step after the prefill returns it
                first = time.perf_counter()
        synchronize(engine.device)
        end = time.perf_counter()
        return first - start, end - first, tokens[ids[0]]

    return run


def transformers_run(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int, static: bool) -> Callable[[], tuple[float, float, list[int]]]:
    ids = torch.tensor(prompts, device=hf.device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static" if static else None)

    def generate(n: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kwargs)
        synchronize(ids.device)
        return time.perf_counter() - start, out

    def run() -> tuple[float, float, list[int]]:
        ttft, _ = generate(1)
        total, out = generate(new_tokens)
        return ttft, max(total - ttft, 1e-9), out[0, ids.shape[1] :].tolist()

    return run


def run_bench(
    model_name: str | None = None,
    preset_name: str = "0.6B",
    device: str | None = None,
    dtype: str | None = None,
    prompt_tokens: int = 32,
    new_tokens: int = 256,
    batch: int = 1,
    reps: int = 3,
    quantization: str | None = None,
    engines: tuple[str, ...] = ENGINES,
    on_row: Callable[[dict, BenchRow], None] | None = None,
    tensor_parallel_size: int = 1,
) -> tuple[dict, list[BenchRow]]:
    """Measure every engine in turn; on_row(setup, row) sees each row as soon as it is measured. With
    tensor_parallel_size N > 1, each qwen3gen row is followed by the same engine over N ranks ("qwen3gen tp=N"; random
    weights are written to a temporary checkpoint folder first, as each rank reads its shard from files)."""
    dev = parse_device(device)
    dt = parse_dtype(dtype) or default_dtype(dev, bool(quantization))
    if tensor_parallel_size > 1 and quantization:
        raise InvalidParameterError("tensor parallelism runs unquantized weights: leave out --quantize.")
    model, checkpoint_dir = load_bench_model(model_name, preset_name, dev, dt)
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 151643, (batch, prompt_tokens), generator=generator).tolist()
    bandwidth = copy_bandwidth(dev)
    kv = kv_bytes_per_step(cfg, batch, prompt_tokens + new_tokens / 2, dt)
    rows: list[BenchRow] = []
    reference: list[int] | None = None
    hf = transformers_model(model, checkpoint_dir) if any(e.startswith("transformers") for e in engines) else None
    unquantized_bytes = weight_bytes_per_step(model) + kv  # what transformers reads per step
    if quantization:
        model = quantize(model, quantization)
    step_bytes = weight_bytes_per_step(model) + kv
    # The engine's pool: room for the whole batch at once (one block of slack per row, block 0 is the scratch block),
    # not the engine's default of most of the memory; one step runs the whole batch's prompts, as transformers does.
    block_size = 16
    blocks_per_row = -(-(prompt_tokens + new_tokens) // block_size) + 1
    engine_options = dict(
        kv_memory=bytes_per_block(cfg, block_size, dt) * (batch * blocks_per_row + 1), block_size=block_size,
        max_running=max(batch, default_limits(dev)[0]), max_batched_tokens=max(batch * prompt_tokens, default_limits(dev)[1]),
    )  # fmt: skip
    setup = {
        "device": device_name(dev),
        "dtype": str(dt).removeprefix("torch."),
        "model": checkpoint_dir or f"random weights, Qwen3-{preset_name} shape",
        "quantization": quantization,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch": batch,
        "reps": reps,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_decode_step": step_bytes,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tensor_parallel_size": tensor_parallel_size,
    }
    baseline = None
    runs = []  # (engine, tensor-parallel size)
    for name in engines:
        if name == "transformers-static" and dev.type != "cuda":
            continue  # transformers compiles its static-cache path only on accelerators
        runs.append((name, 1))
        if tensor_parallel_size > 1 and name.startswith("qwen3gen"):
            runs.append((name, tensor_parallel_size))
    with tempfile.TemporaryDirectory() as scratch:  # the ranks read their shards from files
        shard_dir = None
        if tensor_parallel_size > 1:
            shard_dir = Path(checkpoint_dir) if checkpoint_dir else write_checkpoint(model, Path(scratch))
        for name, size in runs:
            reset_peak_memory(dev)
            engine = None
            if name.startswith("qwen3gen"):
                compiled = name.endswith("compiled")
                if size == 1:
                    engine = Engine(model, compile=compiled, **engine_options)
                else:
                    weights, leader, _ = load_shard(shard_dir, dev, dt, size)
                    engine = Engine(weights, compile=compiled, parallel=leader, **engine_options)
                run = qwen3gen_run(engine, prompts, new_tokens)
            else:
                run = transformers_run(hf, prompts, new_tokens, static=name.endswith("static"))
            try:
                warmup, ttft, decode_s, tokens = median_run(run, reps)
            finally:
                if engine is not None:
                    engine.close()  # the other ranks, if any
            steps_per_s = (new_tokens - 1) / decode_s
            reference = reference or tokens
            same = next((i for i, (a, b) in enumerate(zip(tokens[:32], reference[:32])) if a != b), min(32, len(tokens)))
            label = f"{name} ({quantization})" if quantization and name.startswith("qwen3gen") else name
            label += f" tp={size}" if size > 1 else ""
            rows.append(BenchRow(
                engine=label,
                time_to_first_token_ms=ttft * 1e3,
                decode_tokens_per_s=steps_per_s * batch,
                vs_transformers=None,
                bandwidth_gb_s=steps_per_s * (step_bytes if name.startswith("qwen3gen") else unquantized_bytes) / 1e9,
                bandwidth_share=0.0,
                peak_memory_mib=peak_memory(dev)[0] / 2**20,
                warmup_s=warmup,
                same_tokens=same,
            ))
            row = rows[-1]
            baseline = row.decode_tokens_per_s if name == "transformers" else baseline
            row.vs_transformers = row.decode_tokens_per_s / baseline if baseline else None
            row.bandwidth_share = row.bandwidth_gb_s * 1e9 / bandwidth
            if on_row:
                on_row(setup, row)
    return setup, rows


def parallel_ratios(rows: list[BenchRow]) -> list[str]:
    """Each tensor-parallel row's decode speed against the same engine's row on one rank (the row before it)."""
    return [
        f"{row.engine}: {row.decode_tokens_per_s / before.decode_tokens_per_s:.2f}x {before.engine}"
        for before, row in zip(rows, rows[1:]) if " tp=" in row.engine
    ]  # fmt: skip


TABLE_HEAD = "| engine | TTFT ms | decode tok/s | x transformers | GB/s | % of bandwidth | peak MiB | warm-up s | same first-32 tokens |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"


def format_setup(setup: dict) -> str:
    return (
        f"{setup['model']} | {setup['device']} {setup['dtype']} | batch {setup['batch']} | prompt {setup['prompt_tokens']} "
        f"+ {setup['new_tokens']} new tokens | median of {setup['reps']} | copy bandwidth {setup['copy_bandwidth_gb_s']:.1f} GB/s "
        f"| torch {setup['torch']}"
    )


def format_row(r: BenchRow) -> str:
    ratio = f"{r.vs_transformers:.2f}" if r.vs_transformers else "-"
    return (
        f"| {r.engine} | {r.time_to_first_token_ms:.1f} | {r.decode_tokens_per_s:.1f} | {ratio} | {r.bandwidth_gb_s:.1f} "
        f"| {100 * r.bandwidth_share:.0f}% | {r.peak_memory_mib:.0f} | {r.warmup_s:.1f} | {r.same_tokens} |"
    )


def to_json(setup: dict, rows: list) -> str:
    """A bench's setup and rows (dataclasses) as JSON."""
    return json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2)


# --- offline throughput ------------------------------------------------------------------------------------------------

HF_PAGE_SIZE = 256  # transformers' default page (block) of its continuous-batching cache


@dataclass
class ThroughputRow:
    engine: str
    requests: int  # finished
    prompt_tokens: int
    output_tokens: int  # actually produced (summed over the requests' outputs)
    wall_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt + output tokens over the wall time
    vs_transformers: float | None  # output tokens/s over transformers' row
    peak_memory_mib: float  # the row's own peak (on a CPU, resident memory; the process's so far off Linux)
    kv_pool_mib: float | None  # the KV cache the engine allocated
    note: str | None = None  # why a row has no numbers, or what it approximated


def throughput_defaults(device: torch.device) -> dict:
    """nano-vllm's workload on a GPU; a smaller one elsewhere, that a 2-core CPU runs in about a minute per engine with
    Qwen3-0.6B's shape in bfloat16 (BENCHMARKS.md)."""
    if device.type == "cuda":
        return dict(requests=256, min_prompt_tokens=100, max_prompt_tokens=1024, min_output_tokens=100, max_output_tokens=1024)
    return dict(requests=8, min_prompt_tokens=16, max_prompt_tokens=64, min_output_tokens=16, max_output_tokens=64)


def throughput_workload(
    requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths): lengths uniform in the closed ranges, token ids uniform below 151643 (the specials)."""
    rng = random.Random(seed)
    top = min(151643, vocab)
    prompts = [[rng.randrange(top) for _ in range(rng.randint(*prompt_range))] for _ in range(requests)]
    return prompts, [rng.randint(*output_range) for _ in range(requests)]


def warmup_workload(device: torch.device, concurrency: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) run before a timed workload: on a GPU as many requests as run at once, finishing one
    step apart, so that every decode batch size the timed run meets has its CUDA graph recorded (and compiled)
    beforehand; elsewhere two short requests."""
    count = concurrency if device.type == "cuda" else 2
    prompts, _ = throughput_workload(count, (8, 8), (1, 1), vocab, seed)
    return prompts, [2 + i for i in range(count)]


def qwen3gen_throughput(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> tuple[float, int]:
    """All requests added at once, then step() until none is left: (wall seconds, output tokens produced)."""
    synchronize(engine.device)
    start = time.perf_counter()
    for prompt, n in zip(prompts, lengths):
        engine.add_request(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))
    produced = 0
    while engine.has_unfinished():
        produced += sum(len(out.new_token_ids) for out in engine.step())
    synchronize(engine.device)
    return time.perf_counter() - start, produced


def resident_kv_bytes(
    cfg: Qwen3Config, prompts: list[list[int]], lengths: list[int], dt: torch.dtype, block_size: int = 16
) -> int:
    """A KV pool that holds every request of a workload at once (and the scratch block): no preemption, and no more
    memory taken than the workload can use."""
    blocks = sum(-(-(len(p) + n) // block_size) for p, n in zip(prompts, lengths))
    return bytes_per_block(cfg, block_size, dt) * (1 + blocks)


def warm_up(engine: Engine, warmup: tuple[list[list[int]], list[int]]) -> None:
    """Every step graph recorded, the warm-up workload run (compilation, allocations), and the prefix cache emptied
    so that the timed run finds none of it."""
    engine.warm_up()
    qwen3gen_throughput(engine, *warmup)
    engine.reset_prefix_cache()


def transformers_throughput(
    hf: torch.nn.Module, prompts: list[list[int]], lengths: list[int], warmup: tuple[list[list[int]], list[int]],
    concurrency: int, max_batched_tokens: int, num_blocks: int | None,
) -> tuple[float, int, int, int | None]:
    """transformers' continuous batching through its manager (generate_batch takes one max_new_tokens for all
    requests): add_request with each request's own max_new_tokens, EOS off. The warm-up requests run first on the same
    manager, untimed. (wall seconds, output tokens produced, requests finished, KV cache bytes)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    generation_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max(lengths))
    cb_config = ContinuousBatchingConfig(
        page_size=HF_PAGE_SIZE, num_blocks=num_blocks, max_requests_per_batch=concurrency, max_batch_tokens=max_batched_tokens
    )  # fmt: skip
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(lengths), num_requests=len(prompts))

    def run(manager, batch: list[list[int]], new: list[int], tag: str) -> dict:
        ids = [manager.add_request(p, request_id=f"{tag}{i}", max_new_tokens=n, eos_token_id=-1) for i, (p, n) in enumerate(zip(batch, new))]
        results: dict = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"transformers' generation thread stopped with {len(ids) - len(results)} requests unfinished")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers failed request {result.request_id}: {result.error}")
                results[result.request_id] = result
        return results

    with torch.inference_mode():
        manager = hf.init_continuous_batching(generation_config=generation_config, continuous_batching_config=cb_config, workload_hints=hints)
        try:
            manager.warmup()  # graphs or compilation where transformers uses them (not on a CPU)
            manager.start()
            run(manager, *warmup, "warmup")
            synchronize(hf.device)
            start = time.perf_counter()
            results = run(manager, prompts, lengths, "r")
            synchronize(hf.device)
            wall = time.perf_counter() - start
            cache = getattr(getattr(manager.batch_processor, "cache", None), "cache_tensor", None)
            kv_bytes = cache.numel() * cache.element_size() if cache is not None else None
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()
    return wall, sum(len(r.generated_tokens) for r in results.values()), len(results), kv_bytes


def run_throughput(
    model_name: str | None = None,
    preset_name: str = "0.6B",
    device: str | None = None,
    dtype: str | None = None,
    requests: int | None = None,
    concurrency: int | None = None,
    max_batched_tokens: int | None = None,
    min_prompt_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    min_output_tokens: int | None = None,
    max_output_tokens: int | None = None,
    kv_memory: int | str | None = None,
    engines: tuple[str, ...] = THROUGHPUT_ENGINES,
    seed: int = 0,
    on_row: Callable[[dict, ThroughputRow], None] | None = None,
) -> tuple[dict, list[ThroughputRow]]:
    """Offline throughput of every engine on the same requests; on_row(setup, row) sees each row as it is measured.

    None picks the device's default (throughput_defaults; concurrency and max_batched_tokens: the engine's defaults,
    given to transformers too). kv_memory None: every engine gets a KV cache that holds all the requests at once
    (capped at the engine's default pool size); otherwise every engine gets that many bytes.
    """
    dev = parse_device(device)
    dt = parse_dtype(dtype) or default_dtype(dev)
    defaults = throughput_defaults(dev)
    requests = requests or defaults["requests"]
    prompt_range = (min_prompt_tokens or defaults["min_prompt_tokens"], max_prompt_tokens or defaults["max_prompt_tokens"])
    output_range = (min_output_tokens or defaults["min_output_tokens"], max_output_tokens or defaults["max_output_tokens"])
    default_running, default_batched = default_limits(dev)
    concurrency = concurrency or default_running
    max_batched_tokens = max_batched_tokens or default_batched
    for name, (low, high) in (("prompt", prompt_range), ("output", output_range)):
        if not 1 <= low <= high:
            raise InvalidParameterError(f"the {name} lengths must satisfy 1 <= min <= max, not {low} and {high}.")
    if requests < 1 or concurrency < 1 or max_batched_tokens < 1:
        raise InvalidParameterError("requests, concurrency and max_batched_tokens must be positive.")

    model, checkpoint_dir = load_bench_model(model_name, preset_name, dev, dt)
    cfg = model.config
    prompts, lengths = throughput_workload(requests, prompt_range, output_range, cfg.vocab_size, seed)
    warmup = warmup_workload(dev, min(concurrency, requests), cfg.vocab_size, seed + 1)
    prompt_tokens, wanted_tokens = sum(map(len, prompts)), sum(lengths)

    block_size = 16
    resident = resident_kv_bytes(cfg, prompts, lengths, dt, block_size)
    if kv_memory is None and resident <= default_kv_memory(dev):
        kv_bytes = resident
        hf_blocks = sum(-(-(len(p) + n) // HF_PAGE_SIZE) for p, n in zip(prompts, lengths))
    else:
        kv_bytes = default_kv_memory(dev) if kv_memory is None else parse_size(kv_memory)
        hf_blocks = max(1, kv_bytes // bytes_per_block(cfg, HF_PAGE_SIZE, dt))

    _, memory_kind = peak_memory(dev)
    setup = {
        "device": device_name(dev),
        "dtype": str(dt).removeprefix("torch."),
        "model": checkpoint_dir or f"random weights, Qwen3-{preset_name} shape",
        "requests": requests,
        "concurrency": concurrency,
        "max_batched_tokens": max_batched_tokens,
        "prompt_tokens": list(prompt_range),
        "output_tokens": list(output_range),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": wanted_tokens,
        "kv_memory": kv_memory,
        "seed": seed,
        "sampling": "greedy, EOS ignored",
        "memory_kind": memory_kind,
        "memory_per_row": reset_peak_memory(dev),  # else (a CPU off Linux) the process's peak so far
        "skipped": {},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    rows: list[ThroughputRow] = []
    baseline: float | None = None

    def add(row: ThroughputRow) -> None:
        nonlocal baseline
        if row.engine == "transformers":
            baseline = row.output_tokens_per_s or None
        row.vs_transformers = row.output_tokens_per_s / baseline if baseline and row.output_tokens_per_s else None
        rows.append(row)
        if on_row:
            on_row(setup, row)

    def failed(name: str, why: str) -> ThroughputRow:
        return ThroughputRow(name, 0, 0, 0, 0.0, 0.0, 0.0, None, 0.0, None, why)

    # transformers first: the baseline of every ratio; its copy of the model is freed before the qwen3gen rows.
    order = sorted(engines, key=lambda e: e != "transformers")
    for name in order:
        if name == "qwen3gen-compiled" and dev.type != "cuda":
            setup["skipped"][name] = "compile only changes the CUDA-graph decode steps; on this device it is the eager engine"
            continue
        free_memory(dev)
        reset_peak_memory(dev)
        if name == "transformers":
            try:
                import transformers  # noqa: F401
            except ImportError:
                add(failed(name, "transformers is not installed"))
                continue
            try:
                hf = transformers_model(model, checkpoint_dir)
                wall, produced, finished, hf_kv = transformers_throughput(
                    hf, prompts, lengths, warmup, concurrency, max_batched_tokens, hf_blocks
                )
            except Exception as error:  # transformers' continuous batching is an optional baseline: say why, go on
                add(failed(name, f"transformers' continuous batching failed: {type(error).__name__}: {error}"))
                continue
            finally:
                hf = None
            note = None if produced == wanted_tokens else f"produced {produced} of the {wanted_tokens} output tokens asked for"
            add(ThroughputRow(
                name, finished, prompt_tokens, produced, wall, produced / wall, (prompt_tokens + produced) / wall, None,
                peak_memory(dev)[0] / 2**20, hf_kv / 2**20 if hf_kv else None, note,
            ))  # fmt: skip
        elif name in ("qwen3gen", "qwen3gen-compiled"):
            engine = Engine(
                model, kv_memory=kv_bytes, block_size=block_size, max_running=concurrency,
                max_batched_tokens=max_batched_tokens, compile=name.endswith("compiled"),
            )  # fmt: skip
            warm_up(engine, warmup)
            wall, produced = qwen3gen_throughput(engine, prompts, lengths)
            stats = engine.stats()
            note = f"{stats['preemptions']} preemptions" if stats["preemptions"] else None
            add(ThroughputRow(
                name, requests, prompt_tokens, produced, wall, produced / wall, (prompt_tokens + produced) / wall, None,
                peak_memory(dev)[0] / 2**20, stats["kv_pool_bytes"] / 2**20, note,
            ))  # fmt: skip
            engine = None
        else:
            raise InvalidParameterError(f"unknown engine {name!r} (known: {', '.join(THROUGHPUT_ENGINES)}).")
    free_memory(dev)
    return setup, rows


THROUGHPUT_TABLE_HEAD = (
    "| engine | output tok/s | total tok/s | x transformers | wall s | output tokens | peak MiB | KV pool MiB | note |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def format_throughput_setup(setup: dict) -> str:
    (p0, p1), (o0, o1) = setup["prompt_tokens"], setup["output_tokens"]
    skipped = "".join(f" | {name} skipped: {why}" for name, why in setup["skipped"].items())
    reset = "" if setup["memory_per_row"] else " (the process's peak so far: not reset between rows)"
    memory = setup["memory_kind"] + reset
    return (
        f"{setup['model']} | {setup['device']} {setup['dtype']} | {setup['requests']} requests, concurrency "
        f"{setup['concurrency']}, {setup['max_batched_tokens']} tokens per step | prompts {p0}-{p1} tokens "
        f"({setup['total_prompt_tokens']} in all), outputs {o0}-{o1} ({setup['total_output_tokens']} in all) | "
        f"{setup['sampling']}, seed {setup['seed']} | peak memory: {memory} | torch {setup['torch']}, "
        f"{setup['threads']} threads{skipped}"
    )


def format_throughput_row(r: ThroughputRow) -> str:
    ratio = f"{r.vs_transformers:.2f}" if r.vs_transformers else "-"
    kv = f"{r.kv_pool_mib:.0f}" if r.kv_pool_mib else "-"
    if not r.output_tokens:
        return f"| {r.engine} | - | - | - | - | - | - | - | {r.note or ''} |"
    return (
        f"| {r.engine} | {r.output_tokens_per_s:.1f} | {r.total_tokens_per_s:.1f} | {ratio} | {r.wall_s:.1f} "
        f"| {r.output_tokens} | {r.peak_memory_mib:.0f} | {kv} | {r.note or ''} |"
    )
