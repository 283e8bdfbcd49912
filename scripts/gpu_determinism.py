"""Does the same batch-64 request give the same greedy tokens run after run on the GPU, and if not, which part varies?

Usage (on the GPU machine): python3 scripts/gpu_determinism.py [DEVICE]   (cpu: a 2-layer dry run of the script)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from qwen3gen import preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.model import attention_mask, grouped_query_attention
from qwen3gen.sampling import SamplingParams


def same_every_time(fn, reps: int = 20) -> bool:
    first = fn()
    return all(torch.equal(first, fn()) for _ in range(reps))


def runs(engine: Engine, prompts: list[list[int]], new_tokens: int = 48, n: int = 3) -> list[int]:
    """Rows whose greedy tokens differ from the first run's, for each later run."""
    out = [torch.cat(list(engine.tokens(prompts, new_tokens, SamplingParams(), pad_id=0)), dim=1) for _ in range(n)]
    return [int((o != out[0]).any(dim=1).sum()) for o in out[1:]]


def main(device_name: str = "cuda") -> None:
    device = torch.device(device_name)
    shape = preset("0.6B") if device.type == "cuda" else preset("0.6B").replace(num_hidden_layers=2)
    torch.manual_seed(0)
    for rows in (1, 64, 2048) if device.type == "cuda" else (1, 4):
        x = torch.randn(rows, 1024, device=device, dtype=torch.bfloat16)
        for n, k in ((4096, 1024), (6144, 1024), (1024, 3072), (151936, 1024)):
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            xk = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            print(f"F.linear [{rows}x{k}] x [{n}x{k}]^T bitwise repeatable: {same_every_time(lambda: F.linear(xk, w))}", flush=True)
    for slots in (64, 320):
        q = torch.randn(64, 16, 1, 128, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(64, 8, slots, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        mask = attention_mask(torch.tensor([slots - 10], device=device), slots, torch.zeros(64, dtype=torch.long, device=device), torch.bfloat16)
        for fold in (False, True):
            ok = same_every_time(lambda: grouped_query_attention(q, k, v, mask, fold))
            print(f"attention batch 64, {slots} slots, fold={fold} bitwise repeatable: {ok}", flush=True)
    model = random_model(shape, device, torch.bfloat16)
    prompts = [torch.randint(0, 151643, (32,)).tolist() for _ in range(64)]
    print(f"eager engine, batch 64: rows differing from run 1: {runs(Engine(model), prompts)}", flush=True)
    compiled = Engine(model, compile=True)
    print(f"compiled engine with CUDA graphs, batch 64: rows differing from run 1: {runs(compiled, prompts)}", flush=True)
    compiled.cuda_graphs = False
    print(f"compiled engine without CUDA graphs, batch 64: rows differing from run 1: {runs(compiled, prompts)}", flush=True)
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
        print(f"eager full forward, batch 64 x 32: bitwise repeatable: {same_every_time(lambda: model(ids), reps=3)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
