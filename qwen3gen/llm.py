"""The Python API: load a checkpoint, then generate, stream or chat. The CLI is a thin shell over this."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import Checkpoint, default_device, default_dtype, load_model, parse_dtype, resolve
from .errors import ContextLengthError, InvalidParameterError
from .generate import Engine, Generation, GenerationStats, RowState, run_rows
from .model import Qwen3
from .quantize import quantize
from .sampling import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
FALLBACK_MAX_NEW_TOKENS = 1024
THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class ChatResult:
    answer: str
    reasoning: str  # the thinking between <think> and </think>; empty with enable_thinking=False
    generation: Generation

    @property
    def stats(self) -> GenerationStats | None:
        return self.generation.stats


class ReasoningSplitter:
    """Splits streamed chat text into ("reasoning", text) and ("answer", text) pieces at the think tags.

    Tags may arrive split across pieces, so a tail that could be the start of a tag is held back.
    """

    def __init__(self, thinking: bool) -> None:
        self.state = "reasoning" if thinking else "start"
        self.buffer = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_START):
                self.state, self.buffer = "reasoning", head[len(THINK_START) :]
            elif not THINK_START.startswith(head):
                self.state = "answer"
            else:
                return out
        if self.state == "reasoning":
            before, tag, after = self.buffer.partition(THINK_END)
            if not tag:
                keep = next((n for n in range(len(THINK_END) - 1, 0, -1) if before.endswith(THINK_END[:n])), 0)
                self.buffer = before[len(before) - keep :]
                return out + [("reasoning", before[: len(before) - keep])] * bool(before[: len(before) - keep])
            out += [("reasoning", before)] * bool(before)
            self.state, self.buffer = "answer", after.lstrip("\n")
        if self.state == "answer" and self.buffer:
            out.append(("answer", self.buffer))
            self.buffer = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        kind = "reasoning" if self.state == "reasoning" else "answer"
        out = [(kind, self.buffer)] * bool(self.buffer)
        self.buffer = ""
        return out


class TextStream:
    """Iterates over text pieces as they are decoded; `result` holds the whole Generation once exhausted."""

    def __init__(self, rows: Iterator[tuple[list[RowState], GenerationStats | None]]) -> None:
        self._rows = rows
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for (row,), stats in self._rows:
            piece = row.take_piece()
            if piece:
                yield piece
            if stats is not None:
                self.result = Generation(row.text, row.token_ids, row.finish_reason or "length", stats)


class LLM:
    """A loaded model, its tokenizer and its generation defaults."""

    def __init__(self, model: Qwen3, tokenizer: Tokenizer, generation_config: dict | None = None, compile: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.engine = Engine(self.model, compile=compile)
        eos = self.generation_config.get("eos_token_id", [])
        eos = {eos} if isinstance(eos, int) else set(eos)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def default_sampling(self) -> SamplingParams:
        """The checkpoint's own defaults (generation_config.json): greedy unless it says do_sample."""
        gen = self.generation_config
        if not gen.get("do_sample", False):
            return SamplingParams()
        return SamplingParams(
            temperature=gen.get("temperature", 1.0),
            top_k=gen.get("top_k") or 0,
            top_p=gen.get("top_p") or 1.0,
            min_p=gen.get("min_p") or 0.0,
            repetition_penalty=gen.get("repetition_penalty") or 1.0,
        )

    def sampling_params(self, **overrides: float | int | None) -> SamplingParams:
        """Checkpoint defaults with the caller's non-None values on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self.default_sampling(), **given)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            vocab = self.model.config.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidParameterError(f"token id {bad[0]} is outside the vocabulary (0 to {vocab - 1}).")
        if not ids:
            raise InvalidParameterError("the prompt is empty.")
        return ids

    def _start(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | None,
        stop: str | Sequence[str] | None,
        sync_every: int,
        sampling: dict,
        ignore_eos: bool = False,
    ) -> Iterator[tuple[list[RowState], GenerationStats | None]]:
        params = self.sampling_params(**sampling)
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens") or FALLBACK_MAX_NEW_TOKENS
        if max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens must be >= 1, not {max_new_tokens}.")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not s for s in stops):
            raise InvalidParameterError("a stop string must not be empty.")
        context = self.model.config.max_position_embeddings
        longest = max(map(len, prompts))
        if longest + max_new_tokens > context:
            raise ContextLengthError(
                f"the prompt has {longest} tokens and max_new_tokens is {max_new_tokens}: together more than "
                f"the model's context of {context} tokens."
            )
        eos = frozenset() if ignore_eos else self.eos_token_ids
        return run_rows(self.engine, self.tokenizer, prompts, max_new_tokens, params, eos, stops, sync_every)

    def generate(
        self,
        prompt: Prompt | list[Prompt],
        max_new_tokens: int | None = None,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        n: int = 1,
        ignore_eos: bool = False,
    ) -> Generation | list[Generation] | list[list[Generation]]:
        """Generate for one prompt (text or token IDs), or for a list of them as one batch.

        With n > 1, each prompt gets n samples (rows of the same batch): a list for one prompt, a
        list of lists for several. ignore_eos generates max_new_tokens whatever comes (benchmarks).
        """
        if n < 1:
            raise InvalidParameterError(f"n must be >= 1, not {n}.")
        batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = [self.encode_prompt(p) for p in (prompt if batched else [prompt]) for _ in range(n)]
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
        for rows, stats in self._start(prompts, max_new_tokens, stop, 16, sampling, ignore_eos):
            pass
        results = [Generation(r.text, r.token_ids, r.finish_reason or "length", stats) for r in rows]
        if n > 1:
            results = [results[i : i + n] for i in range(0, len(results), n)]
        return results if batched else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int | None = None, *, stop: str | Sequence[str] | None = None, **sampling: float | int | None) -> TextStream:
        """Like generate, for one prompt, yielding text pieces as soon as they are final."""
        return TextStream(self._start([self.encode_prompt(prompt)], max_new_tokens, stop, 1, sampling))

    def chat_stream(self, messages: list[dict], enable_thinking: bool = True, max_new_tokens: int | None = None, **kwargs: object) -> "ChatStream":
        """Stream the assistant's reply as ("reasoning" | "answer", text) pieces."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        text = self.tokenizer.decode(prompt)
        opens_thinking = text.rfind(THINK_START) > text.rfind(THINK_END)  # the template may open the block itself
        return ChatStream(self.stream(prompt, max_new_tokens, **kwargs), opens_thinking)

    def chat(self, messages: list[dict], enable_thinking: bool = True, max_new_tokens: int | None = None, **kwargs: object) -> ChatResult:
        """One assistant turn: the answer and, apart from it, the reasoning."""
        stream = self.chat_stream(messages, enable_thinking, max_new_tokens, **kwargs)
        for _ in stream:
            pass
        return stream.result


class ChatStream:
    """Iterates over ("reasoning" | "answer", text) pieces; `result` holds the ChatResult once exhausted."""

    def __init__(self, stream: TextStream, opens_thinking: bool) -> None:
        self._stream = stream
        self._opens_thinking = opens_thinking
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        splitter = ReasoningSplitter(self._opens_thinking)
        parts: dict[str, list[str]] = {"reasoning": [], "answer": []}
        for piece in self._stream:
            for kind, text in splitter.feed(piece):
                parts[kind].append(text)
                yield kind, text
        for kind, text in splitter.flush():
            parts[kind].append(text)
            yield kind, text
        self.result = ChatResult("".join(parts["answer"]).strip(), "".join(parts["reasoning"]).strip(), self._stream.result)


def load(
    model: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile: bool = False,
    quantization: str | None = None,
) -> LLM:
    """Load a checkpoint folder, a Hub repo id, an alias ("base", "reasoning"), or a .gguf file (qwen3, qwen2).

    quantization="int8" stores the linear weights as int8 (per-channel scales), with bf16 activations by default.
    """
    if str(model).lower().endswith(".gguf"):
        from . import gguf  # imports the gguf package, for .gguf files only

        checkpoint = gguf.GGUFCheckpoint.open(model)
        tokenizer, read_weights = checkpoint.tokenizer(), gguf.load_model
    else:
        directory = resolve(str(model))
        checkpoint = Checkpoint.open(directory)
        tokenizer, read_weights = Tokenizer.from_dir(directory), load_model
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) or default_dtype(device, quantization)
    weights = read_weights(checkpoint, device, dtype)
    if quantization:
        weights = quantize(weights, quantization)
    return LLM(weights, tokenizer, checkpoint.generation_config, compile=compile)
