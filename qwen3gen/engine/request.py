"""A request: its tokens, its parameters, where it stands, and its text.

The engine knows a request by its token list (prompt, then output) and by how many of those tokens have their keys and
values in the pool (num_computed). Whatever is not computed yet is computed next, a prefill chunk or a decode token
alike; a preempted request just goes back to num_computed = 0 and is recomputed, outputs included. With overlapped
steps (engine.py) a request may have one token more than its list holds: sampled on the device by the step in flight,
not yet read back (pending); the next step computes it from the device.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from ..sampling import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer

Logprob = tuple[int, float, list[tuple[int, float]]]  # (token id, its log-probability, [(alternative, logprob), ...])


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step did for one request. new_token_ids excludes a final EOS; text is the newly final text (with a
    tokenizer), held back while it could still turn into a stop string and cut before one."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort", or None while running
    logprobs: list[Logprob] | None = None
    text: str = ""
    prompt_logprobs: list[Logprob | None] | None = None  # once, when the prompt is done: None for its first token
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """This output and the request's next one as one (a consumer that fell behind takes both at once)."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        prompt_logprobs = self.prompt_logprobs if later.prompt_logprobs is None else later.prompt_logprobs
        tokens, text = self.new_token_ids + later.new_token_ids, self.text + later.text
        return replace(later, new_token_ids=tokens, logprobs=logprobs, text=text, prompt_logprobs=prompt_logprobs)


class TextState:
    """Turns a request's tokens into text and finds stop strings in it."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.text = ""
        self.emitted = 0  # characters of text already handed out

    def push(self, token: int | None) -> bool:
        """Add a token (None: the end) and say whether a stop string has appeared (the text is then cut before it)."""
        piece = self.detokenizer.flush() if token is None else self.detokenizer.push([token])
        self.text += piece
        if not self.stop or not piece:
            return False
        start = max(0, len(self.text) - len(piece) - max(map(len, self.stop)) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def take(self, finished: bool) -> str:
        """New final text; while running, holds back a tail that could still become a stop string."""
        end = len(self.text)
        if not finished and self.stop:
            end -= max(map(len, self.stop)) - 1
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens set
    eos_ids: frozenset[int]
    noise_seed: int  # the seed its draws take their noise from
    text: TextState | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt, then output
    num_computed: int = 0  # tokens whose keys and values are in the pool
    pending: int = 0  # 1 while a token sampled by the step in flight is not yet in token_ids
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache when first admitted
    # Only appended to while the request holds blocks; admitting and releasing it give it a new list (which
    # runner.HostTables relies on to rewrite a recorded step's rows only where they changed).
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of its first full blocks, in the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # of prompt tokens 1, 2, ...
    prompt_logprobs_sent: bool = False
    admitted: bool = False  # has been admitted once (the prefix-cache counters count its prompt once)
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Its tokens, a pending one included: those the steps compute."""
        return len(self.token_ids) + self.pending

    @property
    def last_token_pending(self) -> bool:
        """Whether the pending token is its last (max_new_tokens): no step computes it, the request ends when it is
        read."""
        return self.pending > 0 and self.num_output + self.pending >= self.params.max_new_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int) -> None:
        """Add a sampled token and decide whether the request is finished (EOS, length, stop string)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            self.finish("stop")
            return
        self.token_ids.append(token)
        if self.text is not None and self.text.push(token):
            self.finish("stop", flush=False)  # the text ends before the stop string
        elif self.num_output >= self.params.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str, flush: bool = True) -> None:
        if self.text is not None and flush:
            self.text.push(None)
        self.status, self.finish_reason, self.finished_at = Status.FINISHED, reason, time.perf_counter()
