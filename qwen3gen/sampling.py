"""Choosing the next token: per-request parameters, and pure, batched functions over one step's logits.

    token mask -> repetition / presence / frequency penalties -> temperature -> top-k -> top-p -> min-p
    -> draw (or argmax when temperature is 0)

The filters are transformers' logits warpers, vectorised over rows that each have their own values; penalties follow
transformers (repetition: CTRL-style, over the prompt and the output) and OpenAI (presence and frequency: over the
output). A draw takes the noise of its own request's seed and output index (`seeded_uniform`), so a seeded request
gives the same tokens alone or in any batch, and after being preempted and recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidParameterError

MAX_LOGPROBS = 20
UINT64 = 1 << 64


def _number(name: str, value: object, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise InvalidParameterError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}.")


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling and stopping. temperature 0 is greedy; top_k 0, top_p 1, min_p 0, the penalties' neutral
    values (1, 0, 0) switch a filter off. max_new_tokens None: the caller's default (the checkpoint's). logprobs N:
    the chosen token's log-probability and the N most likely alternatives (0: the chosen one only), from the model's
    own distribution; prompt_logprobs likewise for every prompt token after the first. token_mask(output_ids) returns
    a bool tensor [vocab] of the tokens allowed next (structured outputs), or None for no restriction."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: str | Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    token_mask: Callable[[Sequence[int]], torch.Tensor | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name))
        _number("top_k", self.top_k, integer=True)
        if not self.temperature >= 0:
            raise InvalidParameterError(f"temperature must be >= 0, not {self.temperature}.")
        if self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0, not {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise InvalidParameterError(f"top_p must be in (0, 1], not {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            raise InvalidParameterError(f"min_p must be in [0, 1], not {self.min_p}.")
        if not self.repetition_penalty > 0:
            raise InvalidParameterError(f"repetition_penalty must be > 0, not {self.repetition_penalty}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidParameterError(f"{name} must be in [-2, 2], not {getattr(self, name)}.")
        if self.seed is not None:
            _number("seed", self.seed, integer=True)
            if not -(1 << 63) <= self.seed < UINT64:
                raise InvalidParameterError(f"seed must fit in 64 bits (0 to {UINT64 - 1}), not {self.seed}.")
        if self.max_new_tokens is not None:
            _number("max_new_tokens", self.max_new_tokens, integer=True)
            if self.max_new_tokens < 1:
                raise InvalidParameterError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}.")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise InvalidParameterError("a stop string must be a non-empty string.")
        object.__setattr__(self, "stop", stops)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _number(name, value, integer=True)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise InvalidParameterError(f"{name} must be between 0 and {MAX_LOGPROBS}, not {value}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor, repetition: torch.Tensor,
    presence: torch.Tensor, frequency: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """logits [rows, vocab] (float32); counts: each token's count in the row's output; prompt_seen: in its prompt.
    Repetition (transformers): a token seen in the prompt or output has a positive logit divided, a negative one
    multiplied. Presence and frequency (OpenAI): logit - frequency * count - presence * (count > 0)."""
    seen = prompt_seen | (counts > 0)
    penalty = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    used: tuple[bool, bool] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Temperature, then top-k (0: off), top-p (1: off) and min-p (0: off), each row with its own values [rows];
    filtered-out tokens get -inf. logits: [rows, vocab] float32. used: whether any row has top-k or top-p, and
    whether any has min-p, where the caller knows it (reading it from device tensors waits for the device)."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    if used is None:
        used = bool((top_k > 0).any() or (top_p < 1).any()), bool((min_p > 0).any())
    if used[0]:
        ascending, order = torch.sort(logits, dim=-1)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = ascending.gather(1, (vocab - k)[:, None])
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)[:, None]
        drop[:, -1] = False  # always keep the most likely token
        drop |= ascending == float("-inf")
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if used[1]:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as on unsigned 64-bit integers (torch's int64 shift is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def signed64(value: int) -> int:
    """An integer as the int64 with the same low 64 bits."""
    value %= UINT64
    return value - UINT64 if value >= 1 << 63 else value


def derive_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed` (n samples of one prompt draw differently)."""
    return int(mix64(torch.tensor([signed64(seed)]) + signed64((index + 1) * 0x9E3779B97F4A7C15))[0])


GOLDEN, MIX1, MIX2 = signed64(0x9E3779B97F4A7C15), signed64(0xBF58476D1CE4E5B9), signed64(0x94D049BB133111EB)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): nearby inputs, unrelated outputs."""
    x = (x ^ _shift_right(x, 30)) * MIX1
    x = (x ^ _shift_right(x, 27)) * MIX2
    return x ^ _shift_right(x, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [rows, vocab] float32: a function of each row's seed, its output index and the token
    id alone (a counter-based generator), so a row's noise does not depend on the batch it is drawn in."""
    key = mix64(seeds * GOLDEN + mix64(steps + 1))
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _shift_right(mix64(key[:, None] + tokens * GOLDEN), 40)  # the top 24 bits
    return (bits.float() + 0.5) * 2.0**-24


def draw(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row from probs [rows, vocab]: argmax(p / E) with E exponential noise, which picks token i with
    probability p_i (the Gumbel-max trick in another form), from each row's own noise."""
    exponential = -torch.log(seeded_uniform(seeds, steps, probs.shape[-1]))
    return (probs / exponential).max(dim=-1).indices  # argmax's first maximum, faster on a CPU


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax of logits [rows, vocab] in float32: the chosen tokens' [rows], and the n best (ids, values) [rows, n],
    most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, n, dim=-1) if n else (logprobs[:, :0], chosen[:, None][:, :0])
    return logprobs.gather(1, chosen[:, None])[:, 0], best[1], best[0]
