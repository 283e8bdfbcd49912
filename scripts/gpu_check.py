"""Correctness on a CUDA device, checked against transformers; prints one PASS/FAIL line per check.

Run on the GPU machine (see scripts/gpu_run.sh); the CPU test suite covers the same functions on CPU tensors.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import QWEN3_0_6B, hf_model, write_checkpoint  # noqa: E402
from gpu_determinism import runs  # noqa: E402  (this script's own folder is on the path)

import qwen3gen  # noqa: E402
from qwen3gen import kernels  # noqa: E402
from qwen3gen.bench import random_model  # noqa: E402
from qwen3gen.generate import Engine  # noqa: E402
from qwen3gen.sampling import SamplingParams  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


@contextlib.contextmanager
def pytorch_lines() -> Iterator[None]:
    """The model's own PyTorch lines instead of kernels.py's Triton kernels (the reference for the bf16 check)."""
    available = kernels.available
    kernels.available = lambda device: False
    try:
        yield
    finally:
        kernels.available = available


def greedy(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return torch.cat(list(engine.tokens([prompt], n, SamplingParams(), pad_id=0)), dim=1)[0].tolist()


def main(tokenizer_dir: Path, device: str = "cuda") -> int:
    """device "cpu" with a 2-layer 0.6B shape is a dry run of this script, for catching its own bugs off the GPU."""
    cuda = torch.device(device)
    shape = qwen3gen.preset("0.6B") if device == "cuda" else qwen3gen.preset("0.6B").replace(num_hidden_layers=2)
    print(torch.__version__, transformers.__version__, torch.cuda.get_device_name() if device == "cuda" else device, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model()
        llm = qwen3gen.load(write_checkpoint(Path(tmp), tokenizer_dir, hf), device=device, dtype="float32")
        hf = hf.to(cuda)
        ids = torch.tensor([llm.tokenizer.encode("Explain large language models. And why do they work?")], device=cuda)
        with torch.inference_mode():
            diff = (llm.model(ids) - hf(ids).logits).abs().max().item()
        check("tiny float32 logits vs transformers (cuda)", diff < 1e-4, f"max |diff| {diff:.2e}")
        prompt = ids[0].tolist()
        out = llm.generate(prompt, max_new_tokens=40, temperature=0.0, ignore_eos=True)
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
        check("tiny float32 greedy 40 tokens == transformers (cuda)", out.token_ids == ref)
        prompts = ["Hi", "Explain large language models.", "A much longer prompt that needs more padding on the left side of the batch."]
        batch = llm.generate(prompts, max_new_tokens=24, temperature=0.0, ignore_eos=True)
        single = [llm.generate(p, max_new_tokens=24, temperature=0.0, ignore_eos=True).token_ids for p in prompts]
        check("tiny float32 batch == one at a time (cuda)", [b.token_ids for b in batch] == single)

    torch.manual_seed(0)
    hf = hf_model(**{**QWEN3_0_6B, "num_hidden_layers": shape.num_hidden_layers}, initializer_range=0.02).to(cuda)
    model = random_model(shape, cuda, torch.float32)
    reference = hf.state_dict()
    with torch.no_grad():
        for name, target in model.checkpoint_tensors():
            target.copy_(reference[f"model.{name}"])
    ids = torch.randint(0, 151643, (2, 33), device=cuda)
    with torch.inference_mode():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    check("0.6B float32 logits vs transformers (cuda)", diff < 1e-4, f"max |diff| {diff:.2e}")
    del hf, model
    if device == "cuda":
        torch.cuda.empty_cache()

    # Eager first, then compiled: the two engines share the model, and so its KV cache buffers.
    model = random_model(shape, cuda, torch.bfloat16)
    prompts = [torch.randint(0, 151643, (n,)).tolist() for n in range(1, 21)]
    # 40 new tokens: decoding crosses from 64 to 128 attention slots; the first 32 tokens are compared.
    with pytorch_lines():  # the reference: eager, and none of kernels.py's kernels
        eager_tokens = [greedy(Engine(model), prompt, 40) for prompt in prompts]
    compiled = Engine(model, compile=True)
    start = time.perf_counter()
    compiled.warmup(batch_size=1, prompt_tokens=32, max_new_tokens=40)
    warmup = time.perf_counter() - start
    check("compile warm-up (prefill buckets 16/32, decode at 64 and 128 slots) under 60 s", warmup < 60, f"{warmup:.1f} s")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    recorded = set(compiled.graphs)
    agree, gaps, ties = [], [], []
    for prompt, a in zip(prompts, eager_tokens):
        with torch._dynamo.config.patch(error_on_recompile=True):
            b = greedy(compiled, prompt, 40)
        agree.append(next((i for i, (x, y) in enumerate(zip(a[:32], b[:32])) if x != y), 32))
        if agree[-1] < 32:  # how close the two choices were, in the eager model's own bf16 logits
            k = agree[-1]
            with torch.inference_mode(), torch.compiler.set_stance("force_eager"), pytorch_lines():
                logits = model(torch.tensor([prompt + a[:k]], device=cuda))[0, -1].float()
            ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().max())).item() - 7)  # one bf16 step at the top logit's size
            ties.append(abs(logits[a[k]] - logits[b[k]]).item() <= 2 * ulp)
            gaps.append(f"token {k}: logit {logits[a[k]]:.4f} vs {logits[b[k]]:.4f} (top-1 {logits.max():.4f})")
    check("no recompiles across 20 prompt lengths (cuda)", torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs)
    cuda_graphs = device != "cuda" or (any(key[:2] == (1, 1) for key in recorded) and set(compiled.graphs) == recorded)
    check("decode and prefill run as CUDA graphs recorded at warm-up, none recorded later (cuda)", cuda_graphs, f"(batch, tokens, key length) {sorted(compiled.graphs)}")
    check(
        "bf16 compiled greedy (with kernels.py) == eager PyTorch lines, first 32 tokens, 20 prompts, except at near-ties (within 2 bf16 steps)",
        all(ties), f"leading agreement per prompt: {agree}",
    )
    for gap in gaps:
        print("    divergence at", gap)

    # Run to run at batch 64 (cuBLAS matrix products, many rows): the same request three times gives the same tokens.
    differing = runs(compiled, [torch.randint(0, 151643, (32,)).tolist() for _ in range(64)], new_tokens=80)
    check("batch 64, bf16: three runs of one request give the same greedy tokens", differing == [0, 0], f"rows differing from the first run: {differing}")

    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all CUDA checks passed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), *sys.argv[2:]))
