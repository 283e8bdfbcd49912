"""The next token of every sampled request of a step, each with its own parameters, in one pass over the logits.

Rows are grouped by what they need, and what nobody in the step asks for costs nothing: greedy rows take the argmax
of the logits as they are (the same token the reference picks), sampled rows go through the filters and a seeded draw,
only penalised rows read their token counts, only rows with a token mask call it, only rows asking for logprobs get
a log_softmax. The counts of penalised requests live on the device, a row each, updated with the step's tokens.
Nothing here waits for the device: the tokens and logprobs come back through `Sampled.read`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sampling
from ..attention import to_device
from .request import Logprob, Request


@dataclass
class Sampled:
    """A step's sampled tokens [rows] on the device, the logprobs asked for, and their copies on the way to the host
    (started when the step is launched, so reading them waits for that step only, not for one queued after it)."""

    tokens: torch.Tensor
    logprob_rows: list[int]  # the rows that asked for logprobs, and how many alternatives each wants
    logprob_counts: list[int]
    host: list[torch.Tensor]  # tokens, then (with logprobs) the chosen tokens' logprobs, top ids, top values
    ready: torch.cuda.Event | None

    @classmethod
    def of(cls, tokens: torch.Tensor, logprob_rows: list[int], logprob_counts: list[int], extra: list[torch.Tensor]) -> "Sampled":
        if tokens.device.type != "cuda":  # no steps overlap there: read at once, copied (tokens may be the buffer
            # that the next step writes, runner.DecodeGraph)
            host = [t.to("cpu", copy=True) for t in [tokens, *extra]]
            return cls(tokens, logprob_rows, logprob_counts, host, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in [tokens, *extra]]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))
        return cls(tokens, logprob_rows, logprob_counts, host, ready)

    def read(self) -> tuple[list[int], list[Logprob | None]]:
        """The tokens, and for each row its (token, logprob, top alternatives) or None; waits for this step."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.host[0].tolist()
        out: list[Logprob | None] = [None] * len(tokens)
        if self.logprob_rows:
            chosen, ids, values = (t.tolist() for t in self.host[1:])
            for k, (i, top) in enumerate(zip(self.logprob_rows, self.logprob_counts)):
                out[i] = (tokens[i], chosen[k], list(zip(ids[k][:top], values[k][:top])))
        return tokens, out


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.rows: dict[Request, int] = {}  # penalised requests' rows in counts / prompt_seen
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)

    def release(self, request: Request) -> None:
        self.rows.pop(request, None)

    def _penalty_rows(self, requests: list[Request]) -> torch.Tensor:
        for request in requests:
            if request not in self.rows:
                free = sorted(set(range(len(self.counts))) - set(self.rows.values()))
                row = free[0] if free else self._grow()
                self.rows[request] = row
                output = to_device(request.output_ids, self.device, torch.long)
                self.counts[row] = torch.bincount(output, minlength=self.vocab_size).int()
                self.prompt_seen[row] = False
                self.prompt_seen[row, to_device(request.prompt_ids, self.device, torch.long)] = True
        return to_device([self.rows[r] for r in requests], self.device, torch.long)

    def _grow(self) -> int:
        row = len(self.counts)
        extra = max(8, row)
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.prompt_seen = torch.cat([self.prompt_seen, self.prompt_seen.new_zeros(extra, self.vocab_size)])
        return row

    @torch.inference_mode()
    def sample(self, requests: list[Request], logits: torch.Tensor, greedy: torch.Tensor | None = None) -> Sampled:
        """Tokens for requests[i] from logits[i] [rows, vocab], and the logprobs of those that asked for them. A
        token mask is called with the request's output so far: its engine reads the step before first. greedy: each
        row's largest logit's token where the step computed them (a decode graph; the tokens are then written in
        place, in the buffer the next step reads)."""
        raw = logits
        masked = [i for i, r in enumerate(requests) if r.params.token_mask is not None]
        if masked:
            allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
            for i in masked:
                mask = requests[i].params.token_mask(requests[i].output_ids)
                if mask is not None:
                    allowed[i] = mask.to(logits.device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        penalised = [i for i, r in enumerate(requests) if r.params.penalized]
        if penalised:
            rows = self._penalty_rows([requests[i] for i in penalised])
            at = to_device(penalised, logits.device, torch.long)
            params = [requests[i].params for i in penalised]
            repetition, presence, frequency = self.values(
                [[p.repetition_penalty for p in params], [p.presence_penalty for p in params], [p.frequency_penalty for p in params]]
            )  # fmt: skip
            logits = logits.float()
            logits[at] = sampling.apply_penalties(logits[at], self.counts[rows], self.prompt_seen[rows], repetition, presence, frequency)
        if greedy is None or masked or penalised:
            greedy = logits.max(dim=-1).indices  # argmax's first maximum; argmax is slower on a CPU
        tokens = greedy
        drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
        if drawn:
            picked = to_device(drawn, logits.device, torch.long)
            params = [requests[i].params for i in drawn]
            temperature, top_p, min_p = self.values([[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]])
            top_k, seeds, steps = self.values(
                [[p.top_k for p in params], [requests[i].noise_seed for i in drawn], [requests[i].num_output + requests[i].pending for i in drawn]],
                torch.long,
            )  # fmt: skip
            used = any(p.top_k > 0 or p.top_p < 1 for p in params), any(p.min_p > 0 for p in params)
            filtered = sampling.filter_logits(logits[picked].float(), temperature, top_k, top_p, min_p, used)
            tokens[picked] = sampling.draw(filtered.softmax(dim=-1), seeds, steps)
        if penalised:
            self.counts.index_put_((rows, tokens[at]), torch.ones(len(penalised), dtype=torch.int32, device=self.device), accumulate=True)
        asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        counts = [requests[i].params.logprobs for i in asked]
        extra = []
        if asked:  # the model's own log-probabilities (before masks, penalties and filters)
            picked = to_device(asked, logits.device, torch.long)
            extra = list(sampling.top_logprobs(raw[picked], tokens[picked], max(counts)))
        return Sampled.of(tokens, asked, counts, extra)

    def values(self, values: list[list], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-row parameters [kinds, rows], in one copy to the device."""
        return to_device(values, self.device, dtype)
