"""Where bf16 greedy decoding with the CPU kernels (cpu_kernels.c) picks another token than the PyTorch lines, and whether
each such step is a near-tie: the gap between the PyTorch lines' top two logits, in bf16 steps at that size.

Full 0.6B shape, random weights, the bench's 32-token prompt, eager, 32 greedy tokens each way, both fed the same
tokens (the PyTorch lines' choices). Usage: python scripts/cpu_near_tie.py
"""

from __future__ import annotations

import torch

from qwen3gen import cpu_kernels, preset
from qwen3gen.bench import random_model

STEPS = 32


def logits_along(model: torch.nn.Module, prompt: torch.Tensor, tokens: list[int] | None, fused: bool) -> list[torch.Tensor]:
    """Last-position logits of the prefill and of each decode step, feeding `tokens` (or the own greedy choice)."""
    cpu_kernels.available = lambda device: fused
    model.setup_cache(1, prompt.shape[1] + STEPS)
    out = []
    with torch.no_grad():
        logits = model(prompt, torch.arange(prompt.shape[1]))[:, -1]
        for i in range(STEPS):
            out.append(logits[0].float())
            token = tokens[i] if tokens else int(logits.argmax())
            logits = model(torch.tensor([[token]]), torch.tensor([prompt.shape[1] + i]))[:, -1]
    return out


def main() -> None:
    assert cpu_kernels.available(torch.device("cpu")), cpu_kernels.unavailable_reason()
    model = random_model(preset("0.6B"), torch.device("cpu"), torch.bfloat16)
    prompt = torch.randint(0, 151643, (1, 32), generator=torch.Generator().manual_seed(0))  # as qwen3gen bench draws it
    reference = logits_along(model, prompt, None, fused=False)
    chosen = [int(r.argmax()) for r in reference]
    fused = logits_along(model, prompt, chosen, fused=True)
    for step, (ref, ours) in enumerate(zip(reference, fused)):
        if int(ours.argmax()) != chosen[step]:
            top = ref.topk(2).values
            ulp = 2.0 ** (torch.floor(torch.log2(top[0].abs())) - 7)  # one bf16 step at the top logit's size
            print(f"token {step}: the kernel picks {int(ours.argmax())}, the PyTorch lines {chosen[step]}; their top two logits "
                  f"{top[0]:.6g} and {top[1]:.6g}, {float((top[0] - top[1]) / ulp):.1f} bf16 steps apart; largest logit "
                  f"difference at that step {float((ours - ref).abs().max()):.4g}")  # fmt: skip
    same = sum(int(r.argmax()) == c for r, c in zip(fused, chosen))
    print(f"{same} of {STEPS} steps pick the same token")


if __name__ == "__main__":
    main()
