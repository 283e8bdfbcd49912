"""Choosing the next token: pure functions over logits, in the order transformers applies them.

repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw (or argmax when temperature is 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidParameterError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 switch a filter off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise InvalidParameterError(f"temperature must be >= 0, not {self.temperature}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0, not {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1], not {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            raise InvalidParameterError(f"min_p must be in [0, 1], not {self.min_p}.")
        if not self.repetition_penalty > 0:
            raise InvalidParameterError(f"repetition_penalty must be > 0, not {self.repetition_penalty}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in the row's context less likely (CTRL-style: divide a positive logit, multiply a negative one)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; filtered-out tokens get -inf. logits: [batch, vocab]."""
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - params.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row, [batch]; logits [batch, vocab] in any dtype (penalised and sampled in float32).

    Greedy without a penalty takes the argmax in the logits' own dtype: the same token (widening to float32 is
    exact), without writing and reading a float32 copy of the logits.
    """
    if seen is not None:
        logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
