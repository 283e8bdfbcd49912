"""Cold compile warm-up of the batch-1 engine (as gpu_check measures it), with the mask and rotary angles compiled
per shape and tuned (as baa9ab4 did), compiled once for all shapes without tuning (as the engine does), or left eager. Run each in a fresh process with empty
inductor and Triton caches. Usage (on the GPU machine): python3 scripts/gpu_warmup.py static|dynamic|eager
"""

from __future__ import annotations

import sys
import time

import torch

from qwen3gen import preset
from qwen3gen.bench import random_model
from qwen3gen.generate import Engine
from qwen3gen.model import Qwen3


def main(mode: str) -> None:
    start = time.perf_counter()
    model = random_model(preset("0.6B"), torch.device("cuda"), torch.bfloat16)
    engine = Engine(model, compile=True)
    model.step_inputs = Qwen3.step_inputs.__get__(model)  # undo the engine's own compile, then apply the mode's
    if mode == "static":
        model.step_inputs = torch.compile(model.step_inputs, fullgraph=True, dynamic=False)
    if mode == "dynamic":
        model.step_inputs = torch.compile(model.step_inputs, fullgraph=True, dynamic=True, options={"coordinate_descent_tuning": False})
    built = time.perf_counter()
    engine.warmup(batch_size=1, prompt_tokens=32, max_new_tokens=40)
    print(f"{mode}: model {built - start:.1f} s, warm-up {time.perf_counter() - built:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
