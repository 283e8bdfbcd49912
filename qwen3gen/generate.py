"""The generation loop: prefill the prompt once, then one token at a time through the KV cache.

The loop keeps tokens on the device and copies them to the host in chunks, so the GPU is not
stalled by a host sync every step; on a GPU the next chunk is already queued while the host turns
the last one into text. Rows that hit EOS or a stop string are cut afterwards, and the loop ends as
soon as every row is finished.
"""

from __future__ import annotations

import collections
import functools
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import cpu_kernels
from .model import Qwen3, decode_kernels
from .sampling import SamplingParams, next_token
from .tokenizer import IncrementalDetokenizer, Tokenizer

CACHE_ROUNDING = 64  # a compiled engine keeps its cache while it is big enough, so sizes come in few buckets


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float  # new tokens after the first, over the time they took
    total_s: float
    peak_memory_bytes: int
    memory_kind: str  # what peak_memory_bytes measures: "cuda", "xpu", "mps" or "cpu-rss"

    def summary(self) -> str:
        return (
            f"{self.prompt_tokens} prompt + {self.new_tokens} new tokens | TTFT {self.time_to_first_token_s * 1e3:.1f} ms | "
            f"decode {self.decode_tokens_per_s:.1f} tok/s | total {self.total_s:.2f} s | "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB ({self.memory_kind})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One row's result. token_ids are the new tokens, without a final EOS; text is their decoding, cut before a stop string."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats | None = None


@dataclass
class RowState:
    """Turns one row's tokens into text and decides when it is finished."""

    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    stop: tuple[str, ...]
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already handed out as stream pieces
    generated: int = 0  # tokens the model produced for this row, a final EOS included
    finish_reason: str | None = None

    def push(self, token: int) -> None:
        if self.finish_reason:
            return
        self.generated += 1
        if token in self.eos_ids:
            self.finish(self.detokenizer.flush(), "stop")
            return
        self.token_ids.append(token)
        piece = self.detokenizer.push([token])
        if len(self.token_ids) >= self.max_new_tokens:
            piece += self.detokenizer.flush()
        self.text += piece
        if self.stop and piece:
            start = max(0, len(self.text) - len(piece) - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
                return
        if len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"

    def finish(self, piece: str, reason: str) -> None:
        self.text += piece
        self.finish_reason = reason

    def take_piece(self) -> str:
        """New final text; while running, holds back a tail that could still become a stop string."""
        end = len(self.text)
        if not self.finish_reason and self.stop:
            end -= max(map(len, self.stop)) - 1
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one [batch, length] tensor, right-aligned, and each row's padding count."""
    length = length or max(map(len, prompts))
    pad = torch.tensor([length - len(p) for p in prompts])
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    return ids, pad


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device), "xpu"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), "mps"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "cpu-rss"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)


class HostCopy:
    """A device tensor on its way to the host: on CUDA the copy is queued behind the work already queued, and
    `wait` blocks only until it has arrived, not until the GPU is idle."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type != "cuda":
            self.host = tensor.cpu()
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def bucket(length: int, limit: int) -> int:
    """Round a prompt length up to a power of two (at least 16), so a compiled prefill sees few shapes."""
    return min(max(16, 1 << (length - 1).bit_length()), limit)


class CapturedStep:
    """One call of `step`, recorded as a CUDA graph for these input shapes: a replay launches all its kernels at once.

    Inputs are copied into the graph's own buffers; the result is the graph's output buffer, valid until the
    next replay. The warm-up call before recording compiles the step and runs it for real, so it must be a
    call whose effects (its KV-cache writes) the replay repeats anyway.
    """

    def __init__(self, step: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
        self.inputs = [x.clone() for x in inputs]
        stream = torch.cuda.Stream(self.inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return self.output


class Engine:
    """Runs requests on one model: owns its KV cache and the (optionally compiled) prefill and decode steps.

    Compiled, the model's transformer blocks and final norm are compiled in place (one graph serves all layers,
    so warm-up takes seconds, not minutes) and, on a GPU, each whole step is recorded as one CUDA graph per shape
    and attention length. On a CPU with cpu_kernels, the blocks' parts are compiled instead, for prefill only: decode
    steps there are C kernel calls, run eagerly (see last_logits).
    Prompts are left-padded to a bucket length and the cache is kept while it is big enough, so new
    requests neither recompile nor record again.
    """

    def __init__(self, model: Qwen3, compile: bool = False) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.compiled = compile
        self.cuda_graphs = compile and self.device.type == "cuda"
        # Chunks of tokens kept queued before one is handed out: on a GPU, the host decodes one chunk into text
        # while the next runs. On a CPU the steps run in this thread anyway, so waiting would only delay text.
        self.chunks_ahead = 1 if self.device.type == "cuda" else 0
        self.graphs: dict[tuple[int, ...], CapturedStep] = {}  # by input shape and key length, for the cache they were recorded on
        self.graphs_cache: object = None
        if self.device.type == "cpu":
            cpu_kernels.huge_page_weights(model)
        if compile:
            # A graph per prefill bucket and, on CUDA, per attention length: more than dynamo's default limit of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            if self.device.type == "cuda":
                # Turns matrix-vector products (batch-1 decoding) into tuned reductions fused with their neighbours.
                torch._inductor.config.coordinate_descent_tuning = True
                # Programmatic dependent launch (Hopper and later): each kernel is launched while the one before it
                # finishes, which hides most of the gap between the ~340 kernels of a batch-1 step (+15 % there).
                if hasattr(torch._inductor.config.triton, "enable_pdl"):  # a setting of recent PyTorch releases
                    torch._inductor.config.triton.enable_pdl = True
                # The mask and rotary angles: a few kernels instead of about twenty. One graph for every shape and
                # without tuning: compiled per shape and tuned, they added 28 s to a cold warm-up, this adds 5 s
                # (scripts/gpu_warmup.py). Eager on CPU, where they are a small part of a step.
                if not hasattr(model.step_inputs, "get_compiler_config"):  # not compiled by another engine already
                    options = {"coordinate_descent_tuning": False}
                    model.step_inputs = torch.compile(model.step_inputs, fullgraph=True, dynamic=True, options=options)
            blocks: list[torch.nn.Module] = list(model.layers)
            if decode_kernels(self.device) is cpu_kernels:
                # A one-token step there calls none of a block's parts, only their weights and the kernels: compiling
                # the parts rather than the block keeps those steps out of a compiled module's wrapper (~5 % a step).
                blocks = [part for block in blocks for part in (block.input_layernorm, block.self_attn, block.post_attention_layernorm, block.mlp)]
            for module in [*blocks, model.norm]:  # the final norm: one kernel instead of eight
                module.compile(fullgraph=True, dynamic=False)

    def step(self, ids: torch.Tensor, input_pos: torch.Tensor, pad: torch.Tensor, key_length: int) -> torch.Tensor:
        """Logits of the last position, [batch, vocab]: a prefill (many ids) or a decode step (one id per row)."""
        if not self.cuda_graphs:
            return self.last_logits(ids, input_pos, pad, key_length)
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is not self.graphs_cache:  # a new cache: the recorded graphs point at the old one
            self.graphs, self.graphs_cache = {}, cache
        key = (*ids.shape, key_length)
        if key not in self.graphs:
            step = functools.partial(self.last_logits, key_length=key_length)
            self.graphs[key] = CapturedStep(step, ids, input_pos, pad)
        return self.graphs[key](ids, input_pos, pad)

    def last_logits(self, ids: torch.Tensor, input_pos: torch.Tensor, pad: torch.Tensor, key_length: int) -> torch.Tensor:
        # An eager engine stays eager when another engine has compiled this model's blocks. On a CPU with
        # cpu_kernels, a decode step is already a chain of C kernel calls; compiled, each call would also pass
        # dynamo's guards and the op dispatcher (about 16 ms more a step for 0.6B here), so those steps run eagerly.
        compiled = self.compiled and not (ids.shape[1] == 1 and decode_kernels(self.device) is cpu_kernels)
        with torch.compiler.set_stance("default" if compiled else "force_eager"):
            return self.model(ids, input_pos=input_pos, pad=pad, last_only=True, key_length=key_length)[:, -1]

    def key_length(self, end: int) -> int:
        """Cache slots that a step writing positions up to end - 1 attends over.

        Attention reads every slot it is given, so it gets a few more than `end` rather than the whole cache: at batch
        64 the cache is most of what a step reads. Each length is one recorded CUDA graph and one compiled graph (the
        blocks are compiled for static shapes; on a CPU with cpu_kernels, decode steps are not compiled), so lengths
        come in steps: the next multiple of 64 up to 512 slots, then the next power of two, at most 15 up to the
        40,960-token context.
        A compiled engine never hands over its last CACHE_ROUNDING slots (see ensure_cache).
        """
        usable = self.model.cache_shape[1] - (CACHE_ROUNDING if self.compiled else 0)
        step = 64 if end <= 512 else 1 << (end - 1).bit_length()
        return min(-(-end // step) * step, usable)

    def warmup(self, batch_size: int, prompt_tokens: int, max_new_tokens: int) -> None:
        """Compile ahead of time the decode step and every prefill bucket up to prompt_tokens."""
        top = bucket(prompt_tokens, self.model.config.max_position_embeddings - max_new_tokens)
        self.ensure_cache(batch_size, top + max_new_tokens)
        for length in [16 << k for k in range(12) if 16 << k < top] + [top]:
            for _ in self.tokens([[0] * length] * batch_size, min(max_new_tokens, 3), SamplingParams(), pad_id=0):
                pass
        # A decode step at each attention length the longest request reaches (its cache writes are overwritten later).
        ids, pad = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device), torch.zeros(batch_size, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for key_length in sorted({self.key_length(end) for end in range(1, top + max_new_tokens + 1)}):
                self.step(ids, torch.tensor([key_length - 1], device=self.device), pad, key_length)

    def ensure_cache(self, batch_size: int, length: int) -> None:
        """Allocate the cache for this request; a compiled engine keeps a big-enough one (its CUDA graphs stay valid).

        A compiled engine's cache has CACHE_ROUNDING spare slots that attention never reads: the keys of all slots
        form one contiguous block, a layout that would need a second compiled graph.
        """
        shape = self.model.cache_shape
        if self.compiled:
            if shape and shape[0] == batch_size and shape[1] >= length + CACHE_ROUNDING:
                return
            length = min(-(-length // CACHE_ROUNDING) * CACHE_ROUNDING, self.model.config.max_position_embeddings) + CACHE_ROUNDING
        elif shape == (batch_size, length):
            return
        self.model.setup_cache(batch_size, length)

    @torch.inference_mode()
    def tokens(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        pad_id: int,
        sync_every: int = 16,
    ) -> Iterator[torch.Tensor]:
        """Yield the new tokens as host tensors [batch, k]: the first alone (time to first token), then chunks."""
        longest = max(map(len, prompts))
        context = self.model.config.max_position_embeddings
        length = bucket(longest, context - max_new_tokens) if self.compiled else longest
        ids, pad = left_pad(prompts, pad_id, max(length, longest))
        ids, pad = ids.to(self.device), pad.to(self.device)
        batch, length = ids.shape
        self.ensure_cache(batch, length + max_new_tokens)
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        seen = None
        if params.repetition_penalty != 1.0:
            real = torch.arange(length, device=self.device) >= pad[:, None]
            seen = torch.zeros(batch, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen.scatter_(1, torch.where(real, ids, ids[:, -1:]), True)  # padding slots repeat the last real token

        logits = self.step(ids, torch.arange(length, device=self.device), pad, self.key_length(length))
        token = next_token(logits, seen, params, generator)
        yield token[:, None].cpu()
        input_pos = torch.tensor([length], device=self.device)
        pending, queued = [], collections.deque()
        for step in range(1, max_new_tokens):
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            logits = self.step(token[:, None], input_pos, pad, self.key_length(length + step))
            token = next_token(logits, seen, params, generator)
            input_pos = input_pos + 1
            pending.append(token)
            if len(pending) == sync_every or step == max_new_tokens - 1:
                queued.append(HostCopy(torch.stack(pending, dim=1)))
                pending = []
                if len(queued) > self.chunks_ahead:
                    yield queued.popleft().wait()
        while queued:
            yield queued.popleft().wait()


def run_rows(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: frozenset[int],
    stop: tuple[str, ...],
    sync_every: int,
) -> Iterator[tuple[list[RowState], GenerationStats | None]]:
    """Drive the engine and each row's state; yields after every chunk, and once more with the statistics."""
    rows = [RowState(IncrementalDetokenizer(tokenizer), eos_ids, stop, max_new_tokens) for _ in prompts]
    reset_peak_memory(engine.device)
    start = time.perf_counter()
    first_token_at = start
    chunks = engine.tokens(prompts, max_new_tokens, params, tokenizer.pad_token_id or 0, sync_every)
    for chunk in chunks:
        if first_token_at == start:
            first_token_at = time.perf_counter()
        for row, tokens in zip(rows, chunk.tolist()):
            for token in tokens:
                row.push(token)
        if all(row.finish_reason for row in rows):
            chunks.close()
        yield rows, None
    end = time.perf_counter()
    decoded = sum(max(row.generated - 1, 0) for row in rows)
    memory, memory_kind = peak_memory(engine.device)
    stats = GenerationStats(
        prompt_tokens=sum(map(len, prompts)),
        new_tokens=sum(len(row.token_ids) for row in rows),
        time_to_first_token_s=first_token_at - start,
        decode_tokens_per_s=decoded / (end - first_token_at) if decoded else 0.0,
        total_s=end - start,
        peak_memory_bytes=memory,
        memory_kind=memory_kind,
    )
    yield rows, stats
