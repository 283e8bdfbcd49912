"""`LLM.generate` at batch 64 on the GPU, with and without a chunk queued ahead (Engine.chunks_ahead).

The bench drives the engine directly; this measures the Python API, where the host also turns every row's
tokens into text between chunks. Usage (on the GPU machine): python3 scripts/gpu_overlap.py TOKENIZER_DIR
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from qwen3gen import preset
from qwen3gen.bench import random_model
from qwen3gen.llm import LLM
from qwen3gen.tokenizer import Tokenizer


def main(tokenizer_dir: str, batch: int = 64, new_tokens: int = 256) -> None:
    model = random_model(preset("0.6B"), torch.device("cuda"), torch.bfloat16)
    llm = LLM(model, Tokenizer.from_dir(tokenizer_dir), compile=True)
    prompts = [[1000 + row] * 32 for row in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    print(f"warm-up {time.perf_counter() - start:.1f} s", flush=True)
    tokens = {}
    for ahead in (0, 1, 0, 1, 0, 1):
        llm.engine.chunks_ahead = ahead
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = llm.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        seconds = time.perf_counter() - start
        tokens.setdefault(ahead, []).append(batch * new_tokens / seconds)
        same = [g.token_ids for g in out] == tokens.setdefault(f"ids{ahead}", [g.token_ids for g in out])
        print(f"chunks_ahead={ahead}: {batch * new_tokens / seconds:,.0f} tokens/s end to end, same tokens as before: {same}", flush=True)
    print(f"median: ahead 0 {statistics.median(tokens[0]):,.0f}, ahead 1 {statistics.median(tokens[1]):,.0f} tokens/s;"
          f" identical tokens: {tokens['ids0'] == tokens['ids1']}")


if __name__ == "__main__":
    main(sys.argv[1])
