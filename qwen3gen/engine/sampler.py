"""The next token of every sampled request of a step, each with its own parameters, in one pass over the logits.

Rows are grouped by what they need, and what nobody in the step asks for costs nothing: greedy rows take the argmax
of the logits as they are (the same token the reference picks), sampled rows go through the filters and a seeded draw,
only penalised rows read their token counts, only rows with a token mask call it, only rows asking for logprobs get
a log_softmax. The counts of penalised requests live on the device, a row each, updated with the step's tokens.
"""

from __future__ import annotations

import torch

from .. import sampling
from .request import Logprob, Request


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
                output = torch.tensor(request.output_ids, dtype=torch.long, device=self.device)
                self.counts[row] = torch.bincount(output, minlength=self.vocab_size).int()
                self.prompt_seen[row] = False
                self.prompt_seen[row, torch.tensor(request.prompt_ids, device=self.device)] = True
        return torch.tensor([self.rows[r] for r in requests], device=self.device)

    def _grow(self) -> int:
        row = len(self.counts)
        extra = max(8, row)
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra, self.vocab_size)])
        self.prompt_seen = torch.cat([self.prompt_seen, self.prompt_seen.new_zeros(extra, self.vocab_size)])
        return row

    def sample(self, requests: list[Request], logits: torch.Tensor) -> tuple[list[int], list[Logprob | None]]:
        """Tokens for requests[i] from logits[i] [rows, vocab], and the logprobs of those that asked for them."""
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
            at = torch.tensor(penalised, device=logits.device)
            params = [requests[i].params for i in penalised]
            repetition, presence, frequency = self.values(
                [[p.repetition_penalty for p in params], [p.presence_penalty for p in params], [p.frequency_penalty for p in params]]
            )  # fmt: skip
            logits = logits.float()
            logits[at] = sampling.apply_penalties(logits[at], self.counts[rows], self.prompt_seen[rows], repetition, presence, frequency)
        tokens = logits.argmax(dim=-1)
        drawn = [i for i, r in enumerate(requests) if not r.params.greedy]
        if drawn:
            picked = torch.tensor(drawn, device=logits.device)
            params = [requests[i].params for i in drawn]
            temperature, top_p, min_p = self.values([[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]])
            top_k, seeds, steps = self.values(
                [[p.top_k for p in params], [requests[i].noise_seed for i in drawn], [requests[i].num_output for i in drawn]],
                torch.long,
            )  # fmt: skip
            filtered = sampling.filter_logits(logits[picked].float(), temperature, top_k, top_p, min_p)
            tokens[picked] = sampling.draw(filtered.softmax(dim=-1), seeds, steps)
        if penalised:
            self.counts.index_put_((rows, tokens[at]), torch.ones(len(penalised), dtype=torch.int32, device=self.device), accumulate=True)
        chosen = tokens.tolist()
        return chosen, self.logprobs(requests, raw, tokens)

    def values(self, values: list[list], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-row parameters [kinds, rows], in one copy to the device."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def logprobs(self, requests: list[Request], logits: torch.Tensor, tokens: torch.Tensor) -> list[Logprob | None]:
        """The model's own log-probabilities (before masks, penalties and filters) of the chosen tokens and the top-N."""
        asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        out: list[Logprob | None] = [None] * len(requests)
        if not asked:
            return out
        picked = torch.tensor(asked, device=logits.device)
        n = max(requests[i].params.logprobs for i in asked)
        chosen, ids, values = sampling.top_logprobs(logits[picked], tokens[picked], n)
        for i, token, lp, alt_ids, alt_values in zip(asked, tokens[picked].tolist(), chosen.tolist(), ids.tolist(), values.tolist()):
            top = requests[i].params.logprobs
            out[i] = (token, lp, list(zip(alt_ids[:top], alt_values[:top])))
        return out

