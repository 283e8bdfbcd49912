"""Which requests run in the next step, and how many of their tokens: one token budget for decodes and prefill chunks.

Each step: first every running request that is decoding gets its one token, then running requests still in their
prompt get the next chunk of it, then waiting requests are admitted (their cached prefix first) while the budget,
the running limit and the pool allow, the last one admitted perhaps with only a chunk of its prompt. So a long prompt
is computed over several steps while the decodes go on beside it, and n samples of one prompt admitted together share
its blocks from the first step. When a running request needs a block the pool does
not have, the most recently admitted request is preempted (its blocks released, to be recomputed when it is admitted
again, at the front of the queue): the pool never grows and the engine never runs out of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, Status


@dataclass
class ScheduledStep:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens each computes in this step
    preempted: list[Request] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, max_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished or aborted) and release its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.release(request)

    def schedule(self) -> ScheduledStep:
        step, budget = ScheduledStep(), self.max_batched_tokens
        planned: dict[Request, int] = {}
        active = [r for r in self.running if not r.last_token_pending]
        decoding = [r for r in active if r.num_tokens - r.num_computed == 1]
        prefilling = [r for r in active if r.num_tokens - r.num_computed > 1]
        for request in decoding + prefilling:
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            tokens = min(request.num_tokens - request.num_computed, budget)
            while not self.blocks.grow(request, request.num_computed + tokens):
                victim = self.running[-1]
                budget += planned.pop(victim, 0)
                self._preempt(victim, step)
                if victim is request:
                    break
            else:
                planned[request] = tokens
                budget -= tokens
        for request, tokens in planned.items():  # no more preemptions in this step: its blocks will be computed
            self.blocks.commit(request, request.num_computed + tokens)
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            request = self.waiting[0]
            hits = [] if request.params.prompt_logprobs is not None else self.blocks.match_prefix(request)
            computed = len(hits) * self.blocks.block_size
            tokens = min(request.num_tokens - computed, budget)
            if not self.blocks.can_admit(hits, computed + tokens):
                break
            self.waiting.popleft()
            self.blocks.admit(request, hits)
            self.blocks.grow(request, computed + tokens)
            self.blocks.commit(request, computed + tokens)  # the next request of this step may share them already
            request.status = Status.RUNNING
            self.running.append(request)
            planned[request] = tokens
            budget -= tokens
        for request, tokens in planned.items():
            step.requests.append(request)
            step.num_tokens.append(tokens)
        return step

    def _preempt(self, request: Request, step: ScheduledStep) -> None:
        self.running.remove(request)
        self.blocks.release(request)
        request.status = Status.WAITING
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)
        step.preempted.append(request)
