"""`qwen3gen bench`: qwen3gen (eager, compiled) and transformers side by side, in one run, on one model.

Every engine decodes the same random prompts greedily for the same number of tokens (EOS ignored), with
warm-up runs excluded and the median of several repetitions reported. Decoding is memory-bound, so
each row also shows the bandwidth it achieves (bytes read per decode step x steps per second) against
the device's copy bandwidth, measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .checkpoint import Checkpoint, default_device, default_dtype, load_model, parse_dtype, resolve
from .config import Qwen3Config, preset
from .engine import Engine
from .model import Qwen3
from .quantize import quantize
from .results import peak_memory, reset_peak_memory
from .sampling import SamplingParams

# transformers first: its row is the baseline of every later row's ratio, and its tokens the reference.
ENGINES = ("transformers", "qwen3gen", "qwen3gen-compiled", "transformers-static")


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
    with torch.device("meta"):
        model = Qwen3(cfg).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def weight_bytes_per_step(model: Qwen3) -> int:
    """Bytes of weights one decode step reads: all of them, except an embedding table only looked up row by row."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for n, t in model.named_buffers() if "kv_cache" not in n)
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes_per_step(cfg: Qwen3Config, batch: int, context: float, dtype: torch.dtype) -> float:
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    return batch * per_token * context


def transformers_model(model: Qwen3, checkpoint_dir: str | None) -> torch.nn.Module:
    """The same weights in transformers' Qwen3ForCausalLM (a benchmark-only, optional dependency)."""
    import transformers

    weight = model.embed_tokens.weight
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
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            if first is None:
                synchronize(engine.device)
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
) -> tuple[dict, list[BenchRow]]:
    """Measure every engine in turn; on_row(setup, row) sees each row as soon as it is measured."""
    dev = torch.device(device) if device else default_device()
    dt = parse_dtype(dtype) or default_dtype(dev, quantization)
    checkpoint_dir = str(resolve(model_name)) if model_name else None
    if checkpoint_dir:
        model = load_model(Checkpoint.open(checkpoint_dir), dev, dt)
    else:
        model = random_model(preset(preset_name), dev, dt)
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
    setup = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
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
    }
    baseline = None
    for name in engines:
        if name == "transformers-static" and dev.type != "cuda":
            continue  # transformers compiles its static-cache path only on accelerators
        reset_peak_memory(dev)
        if name.startswith("qwen3gen"):
            run = qwen3gen_run(Engine(model, compile=name.endswith("compiled")), prompts, new_tokens)
        else:
            run = transformers_run(hf, prompts, new_tokens, static=name.endswith("static"))
        warmup, ttft, decode_s, tokens = median_run(run, reps)
        steps_per_s = (new_tokens - 1) / decode_s
        reference = reference or tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens[:32], reference[:32])) if a != b), min(32, len(tokens)))
        label = f"{name} ({quantization})" if quantization and name.startswith("qwen3gen") else name
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


def to_json(setup: dict, rows: list[BenchRow]) -> str:
    return json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2)
