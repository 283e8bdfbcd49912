"""The engine loop: requests come in at any time, each step runs every running request one forward pass further.

    add_request -> waiting -> (scheduler) running -> step: runner computes the scheduled tokens -> sampler picks the
    next token of each request whose tokens are all computed -> stop rules -> finished requests leave, blocks freed

add_request and abort may be called from any thread while another calls step: one lock orders them, so an abort lands
between two steps and its blocks are free when it returns.

With overlap (on CUDA), a step is launched before the one before it is read back: the next step's decode inputs are
that step's sampled tokens, still on the device (a request's pending token), and the host reads them while the new
step runs. A device runs its queue in order, so blocks freed while a step is in flight are reused only by later steps.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..attention import choose_backend, to_device
from ..errors import ContextLengthError, EngineError, InvalidParameterError, OutOfMemoryError
from ..model import Qwen3
from ..sampling import SamplingParams, signed64, top_logprobs
from ..tokenizer import Tokenizer
from .block_manager import BlockManager
from .kv_pool import KVPool
from .request import Logprob, Request, RequestOutput, TextState
from .runner import ModelRunner, PendingTokens, StepLogits
from .sampler import Sampled, Sampler
from .scheduler import ScheduledStep, Scheduler

if TYPE_CHECKING:
    from .distributed import Leader

DEFAULT_MAX_NEW_TOKENS = 1024


def default_limits(device: torch.device) -> tuple[int, int]:
    """(running requests, tokens per step): on a GPU enough rows to fill it; on a CPU, where a step's time grows with
    its tokens, smaller steps that keep decodes moving."""
    return (256, 8192) if device.type == "cuda" else (64, 512)


@dataclass
class InFlight:
    """A launched step whose results are still on the device (or on their way to the host)."""

    requests: list[Request]
    pending: PendingTokens  # its sampled tokens, and the row of each request that sampled one
    sampled: Sampled | None
    prompt: dict[Request, tuple[int, Sampled]]  # prompt logprobs from position start on


class Engine:
    """Continuous batching over a paged KV cache with prefix caching, on one model.

    kv_memory: the pool's size (bytes or "8GiB"; default: most of the free GPU memory, or a modest share of a CPU's).
    tokenizer: lets requests have stop strings and outputs carry text. eos_ids: the default stop tokens.
    kernels=False runs the reference attention lines (the oracle of the tests) even where kernels exist.
    overlap (default: on CUDA) launches each step before reading back the one before it, so that the host's work of a
    step (scheduling, inputs, outputs) runs while the device computes; where the device runs each operation as it is
    called (a CPU), it would only compute a token more after each finish.
    parallel: the other tensor-parallel ranks (distributed.Leader), when the model is rank 0's shard (parallel.py):
    they get every step too, and close() stops them.
    """

    def __init__(
        self,
        model: Qwen3,
        tokenizer: Tokenizer | None = None,
        eos_ids: frozenset[int] = frozenset(),
        *,
        kv_memory: int | str | None = None,
        block_size: int = 16,
        max_running: int | None = None,
        max_batched_tokens: int | None = None,
        compile: bool = False,
        kernels: bool = True,
        overlap: bool | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        parallel: Leader | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        weight = model.norm.weight  # the model's device and dtype (the embedding may be blocks.py's)
        self.device, self.config = weight.device, model.config
        running, batched = default_limits(self.device)
        self.max_running = max_running or running
        self.max_batched_tokens = max_batched_tokens or batched
        for name, value in (("max_running", self.max_running), ("max_batched_tokens", self.max_batched_tokens), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, not {value!r}.")
        self.default_max_new_tokens = default_max_new_tokens
        self.backend = choose_backend(self.device, kernels)
        self.pool = KVPool.sized(self.config, kv_memory, block_size, weight.dtype, self.device)
        self.blocks = BlockManager(self.pool.num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, self.max_running, self.max_batched_tokens)
        self.runner = ModelRunner(model, self.pool, self.backend, self.max_running, self.max_batched_tokens, compile)
        self.parallel = parallel
        # A rank's model holds its share of the vocabulary; the logits it returns are the whole vocabulary's.
        self.vocab_size = self.config.vocab_size if parallel is None else parallel.vocab_size
        if parallel is not None:
            options = dict(max_rows=self.max_running, max_tokens=self.max_batched_tokens, compile=compile)
            self.runner = parallel.lead(self.runner, kernels=kernels, **options)
        self.sampler = Sampler(self.vocab_size, self.device)
        self.requests: dict[str, Request] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self.steps = self.generated_tokens = self.computed_prompt_tokens = 0
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self.in_flight: InFlight | None = None

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None,
        text: bool = True,
    ) -> str:  # fmt: skip
        """Queue a request; returns its id. Refused at once (InvalidParameterError, ContextLengthError,
        OutOfMemoryError) when it could never run. text=False: its outputs carry no text (no detokenizing at every
        step), unless it has stop strings, which need it."""
        params = params or SamplingParams()
        ids = [int(t) for t in prompt_ids]
        vocab, context = self.vocab_size, self.config.max_position_embeddings
        if not ids:
            raise InvalidParameterError("the prompt is empty.")
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidParameterError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1}).")
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("stop strings need an engine with a tokenizer.")
        max_new = params.max_new_tokens or min(self.default_max_new_tokens, context - len(ids))
        if len(ids) + max_new > context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new}: together more than the model's "
                f"context of {context} tokens."
            )
        if len(ids) + max_new > self.blocks.capacity_tokens:
            raise OutOfMemoryError(
                f"the request needs room for {len(ids) + max_new:,} tokens but the KV pool holds "
                f"{self.blocks.capacity_tokens:,} ({self.pool.nbytes / 2**20:,.0f} MiB); give a larger kv_memory "
                "(--kv-memory) or ask for fewer tokens."
            )
        seed = params.seed if params.seed is not None else int(torch.randint(0, 1 << 62, ()).item())
        with self._lock:
            request_id = str(next(self._ids)) if request_id is None else request_id
            if request_id in self.requests:
                raise InvalidParameterError(f"a request with id {request_id!r} is already in the engine.")
            params = params if params.max_new_tokens else replace(params, max_new_tokens=max_new)
            text = self.tokenizer is not None and (text or bool(params.stop))
            text = TextState(self.tokenizer, params.stop) if text else None
            eos = frozenset() if params.ignore_eos else self.eos_ids
            request = Request(request_id, ids, params, eos, signed64(seed), text)
            self.requests[request_id] = request
            self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; EngineError for one the engine does not hold (a finished request
        leaves the engine in the step that finishes it)."""
        with self._lock:
            request = self.requests.get(request_id)
            if request is None:
                raise EngineError(f"there is no request {request_id!r} in the engine.")
            request.finish("abort", flush=False)
            self._leave(request)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting or self.scheduler.running or self.in_flight)

    def step(self) -> list[RequestOutput]:
        """One forward pass over the running requests; returns the new tokens of each (finished ones leave the
        engine). With overlap, the pass is launched and the outputs are those of the step before it, read back while
        this one runs; a request finished by that step may have had one more token computed, then dropped."""
        with self._lock:
            outputs = []
            if self.in_flight is not None and any(r.params.token_mask is not None for r in self.in_flight.requests):
                outputs = self._read()  # a token mask is computed from every token before it
            scheduled = self.scheduler.schedule()
            launched = self._launch(scheduled) if scheduled else None
            if self.in_flight is not None:
                outputs += self._read()
            self.in_flight = launched
            for request in launched.pending.rows if launched else ():
                request.pending = 1
            if self.in_flight is not None and not self.overlap:
                outputs += self._read()
            return outputs

    def _launch(self, scheduled: ScheduledStep) -> InFlight:
        """Queue the step's pass and its sampling on the device."""
        for request, n in zip(scheduled.requests, scheduled.num_tokens):
            self.computed_prompt_tokens += max(0, min(request.num_computed + n, request.prompt_len) - request.num_computed)
        previous = self.in_flight.pending if self.in_flight is not None else None
        try:
            step = self.runner.run(scheduled.requests, scheduled.num_tokens, previous)
            prompt = {r: self._score_prompt(r, step, *rows) for r, rows in step.prompt_rows.items()}
            for request, n in zip(scheduled.requests, scheduled.num_tokens):
                request.num_computed += n
            requests = list(step.sample_rows)
            sampled = self.sampler.sample(requests, *step.sampled_logits()) if requests else None
        except BaseException:  # an interrupt, or a failed kernel: this step's blocks were entered as cached
            self._fail(scheduled.requests)  # but never computed, and its requests cannot go on
            raise
        self.steps += 1
        pending = PendingTokens(sampled.tokens if sampled else None, {r: i for i, r in enumerate(requests)})
        return InFlight(scheduled.requests, pending, sampled, prompt)

    def _read(self) -> list[RequestOutput]:
        """The in-flight step's tokens and logprobs, back on the host: appended to their requests, as outputs."""
        flight, self.in_flight = self.in_flight, None
        try:
            tokens, logprobs = flight.sampled.read() if flight.sampled is not None else ([], [])
            prompt = {r: (start, scored.read()[1]) for r, (start, scored) in flight.prompt.items()}
        except BaseException:
            self._fail(flight.requests)
            raise
        for request, (start, values) in prompt.items():  # positions start...; a recomputed prompt has some already
            request.prompt_logprobs += values[len(request.prompt_logprobs) - start :]
        outputs = []
        for request, token, logprob in zip(flight.pending.rows, tokens, logprobs):
            request.pending = 0
            if request.finished:  # aborted, or finished by the step before: this token was one too many
                continue
            before = request.num_output
            request.append(token)
            self.generated_tokens += 1
            new = request.token_ids[request.prompt_len + before :]  # not output_ids[before:]: a copy of every output
            if logprob is not None and new:
                request.logprobs.append(logprob)
            outputs.append(self._output(request, new, [logprob] if logprob is not None and new else None))
            if request.finished:
                self._leave(request)
        for request in prompt:  # scored its whole prompt in this step, but samples nothing yet
            if not request.finished and request not in flight.pending.rows and self._prompt_scored(request):
                outputs.append(self._output(request, [], None))
        return outputs

    def _fail(self, requests: list[Request]) -> None:
        """A step failed: its requests (and those of the step in flight) cannot go on, and blocks entered as cached for
        it were perhaps never computed."""
        self.blocks.reset_cache()
        flight, self.in_flight = self.in_flight, None
        for request in [*requests, *(flight.requests if flight else ())]:
            if request.request_id in self.requests:
                request.finish("abort", flush=False)
                self._leave(request)

    def _output(self, request: Request, new: list[int], logprobs: list[Logprob] | None) -> RequestOutput:
        text = request.text.take(request.finished) if request.text is not None else ""
        prompt = None
        if self._prompt_scored(request) and not request.prompt_logprobs_sent:
            prompt, request.prompt_logprobs_sent = [None, *request.prompt_logprobs], True
        return RequestOutput(
            request.request_id, new, request.finished, request.finish_reason, logprobs, text, prompt, request.num_cached_tokens
        )

    @staticmethod
    def _prompt_scored(request: Request) -> bool:
        """Whether the request asked for prompt logprobs and has all of them (every prompt token after the first)."""
        return request.params.prompt_logprobs is not None and len(request.prompt_logprobs) >= request.prompt_len - 1

    def _score_prompt(self, request: Request, step: StepLogits, first: int, count: int) -> tuple[int, Sampled]:
        """The log-probabilities of the prompt tokens after the positions this step computes (from the first not
        computed before it), on their way to the host."""
        start = request.num_computed
        targets = to_device(request.prompt_ids[start + 1 : start + 1 + count], step.logits.device, torch.long)
        top = request.params.prompt_logprobs
        scores = top_logprobs(step.logits[first : first + count], targets, top)
        return start, Sampled.of(targets, list(range(count)), [top] * count, list(scores))

    def _leave(self, request: Request) -> None:
        """A finished or aborted request leaves the engine: its blocks and its sampler row are free."""
        self.scheduler.remove(request)
        self.sampler.release(request)
        del self.requests[request.request_id]

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (nothing to do otherwise)."""
        if self.parallel is not None:
            self.parallel.close()

    def reset_prefix_cache(self) -> None:
        """Forget the prefix cache: later requests compute their prompts again (benchmarks repeating one workload)."""
        with self._lock:
            self.blocks.reset_cache()

    def warm_up(self) -> None:
        """Record every step graph (and compile) now rather than at the first step of each size; nothing to do where
        steps are not recorded (off CUDA)."""
        with self._lock:
            self.runner.record_graphs()

    def stats(self) -> dict:
        with self._lock:
            blocks = self.blocks
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": blocks.num_blocks - 1,
                "kv_blocks_used": blocks.num_blocks - 1 - blocks.num_free,
                "kv_blocks_free": blocks.num_free,
                "kv_block_size": blocks.block_size,
                "kv_pool_bytes": self.pool.nbytes,
                "prefix_cache_hit_tokens": blocks.hit_tokens,
                "prefix_cache_queried_tokens": blocks.queried_tokens,
                "computed_prompt_tokens": self.computed_prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "preemptions": self.scheduler.preemptions,
                "steps": self.steps,
                "attention_backend": self.backend.name,
            }
