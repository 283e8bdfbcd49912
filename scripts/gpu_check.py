"""Correctness on a CUDA device through the engine, checked against transformers and against the reference attention
lines; prints one PASS/FAIL line per check.

Run on the GPU machine (see scripts/gpu_run.sh); `python3 scripts/gpu_check.py TOKENIZER_DIR cpu` is a dry run of
this script on a 2-layer shape (the CPU test suite covers the same functions on CPU tensors).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import QWEN3_0_6B, hf_model, write_checkpoint  # noqa: E402

import qwen3gen  # noqa: E402
from qwen3gen import Engine, SamplingParams  # noqa: E402
from qwen3gen.bench import random_model  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def greedy(engine: Engine, prompts: list[list[int]], n: int, params: list[SamplingParams] | None = None) -> list[list[int]]:
    """All prompts through the engine at once, EOS ignored (greedy unless params are given)."""
    params = params or [SamplingParams(max_new_tokens=n, ignore_eos=True)] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


def main(tokenizer_dir: Path, device: str = "cuda") -> int:
    dev = torch.device(device)
    shape = qwen3gen.preset("0.6B") if device == "cuda" else qwen3gen.preset("0.6B").replace(num_hidden_layers=2)
    print(torch.__version__, transformers.__version__, torch.cuda.get_device_name() if device == "cuda" else device, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model()
        llm = qwen3gen.load(write_checkpoint(Path(tmp), tokenizer_dir, hf), device=device, dtype="float32", kv_memory="1GiB")
        print("attention backend:", llm.engine.backend.name, flush=True)
        hf = hf.to(dev)
        ids = torch.tensor([llm.tokenizer.encode("Explain large language models. And why do they work?")], device=dev)
        with torch.inference_mode():
            diff = (llm.model(ids) - hf(ids).logits).abs().max().item()
        check("tiny float32 logits vs transformers", diff < 1e-4, f"max |diff| {diff:.2e}")
        prompt = ids[0].tolist()
        out = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        check("tiny float32 engine greedy, 40 tokens == transformers", out.token_ids == ref)
        prompts = [torch.randint(0, 151643, (n,)).tolist() for n in (1, 7, 30, 100, 300)]
        together = greedy(llm.engine, prompts, 24)
        check("tiny float32: five requests together == one at a time", together == [greedy(llm.engine, [p], 24)[0] for p in prompts])

    torch.manual_seed(0)
    hf = hf_model(**{**QWEN3_0_6B, "num_hidden_layers": shape.num_hidden_layers}, initializer_range=0.02).to(dev)
    model = random_model(shape, dev, torch.float32)
    reference = hf.state_dict()
    with torch.no_grad():
        for name, target in model.checkpoint_tensors():
            target.copy_(reference[f"model.{name}"])
    ids = torch.randint(0, 151643, (2, 33), device=dev)
    with torch.inference_mode():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    check("0.6B float32 logits vs transformers", diff < 1e-4, f"max |diff| {diff:.2e}")
    del hf, model
    if device == "cuda":
        torch.cuda.empty_cache()

    model = random_model(shape, dev, torch.bfloat16)
    prompts = [torch.randint(0, 151643, (n,)).tolist() for n in range(1, 21)]
    eager = greedy(Engine(model, kv_memory="2GiB", kernels=False), prompts, 40)  # the reference lines, no graphs
    start = time.perf_counter()
    fast = Engine(model, kv_memory="2GiB", compile=True)
    first = greedy(fast, prompts[:1], 4)
    check("compiled engine's first request (compile + graph of batch 1) under 60 s", time.perf_counter() - start < 60,
          f"{time.perf_counter() - start:.1f} s, backend {fast.backend.name}")  # fmt: skip
    compiled = greedy(fast, prompts, 40)
    check("the first request's tokens again", compiled[0][:4] == first[0])
    agree, ties = [], []
    for prompt, a, b in zip(prompts, eager, compiled):
        agree.append(next((i for i, (x, y) in enumerate(zip(a[:32], b[:32])) if x != y), 32))
        if agree[-1] < 32:  # how close the two choices were, in the reference's own bf16 logits
            k = agree[-1]
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + a[:k]], device=dev))[0, -1].float()
            ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().max())).item() - 7)
            ties.append(abs(logits[a[k]] - logits[b[k]]).item() <= 2 * ulp)
            print(f"    divergence at token {k}: logit {logits[a[k]]:.4f} vs {logits[b[k]]:.4f}", flush=True)
    check("bf16 engine with kernels and graphs == reference lines, first 32 tokens of 20 requests, except at near-ties",
          all(ties), f"leading agreement per request: {agree}")  # fmt: skip
    mixed = [SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8 * (i % 2), top_p=0.9, seed=i,
                            repetition_penalty=1.0 + 0.1 * (i % 3)) for i in range(20)]  # fmt: skip
    overlapped = greedy(fast, prompts, 40, mixed)
    fast.overlap = False
    synchronous = greedy(fast, prompts, 40, mixed)
    fast.overlap = True
    check("overlapped steps (decode tokens fed from the device) == synchronous steps, greedy and seeded sampling",
          overlapped == synchronous, f"requests differing: {sum(a != b for a, b in zip(overlapped, synchronous))}")  # fmt: skip
    drawn = [SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.8 * (i % 2), seed=i) for i in range(20)]
    recorded = greedy(fast, prompts, 40, drawn)  # decode graphs leave the greedy tokens where the next step reads
    graphs, fast.runner.use_graphs = fast.runner.use_graphs, False
    unrecorded = greedy(fast, prompts, 40, drawn)
    fast.runner.use_graphs = graphs
    check("recorded steps (greedy tokens fed inside the graph, draws written over them) == the same kernels unrecorded",
          recorded == unrecorded, f"requests differing: {sum(a != b for a, b in zip(recorded, unrecorded))}")  # fmt: skip
    long = torch.randint(0, 151643, (1024,)).tolist()  # one recorded prefill step of 1,024 tokens
    first = greedy(fast, [long], 1)[0][0]
    with torch.inference_mode():  # a float32 copy: the engine's recorded graphs hold the bf16 weights' addresses
        exact = copy.deepcopy(model).float()(torch.tensor([long], device=dev))[0, -1]
    gap = (exact.max() - exact[first]).item()
    check("1,024-token prompt: the bf16 engine's first token is float32's, or within 0.1 of its logit (a near-tie)",
          gap < 0.1, f"float32 top {exact.argmax().item()} vs ours {first}, logit gap {gap:.4f}")  # fmt: skip
    batch = [torch.randint(0, 151643, (32,)).tolist() for _ in range(64)]
    runs = [greedy(fast, batch, 80) for _ in range(3)]
    differing = [sum(a != b for a, b in zip(runs[0], r)) for r in runs[1:]]
    check("batch 64, bf16: three runs give the same greedy tokens", differing == [0, 0], f"requests differing: {differing}")
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all CUDA checks passed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), *sys.argv[2:]))
