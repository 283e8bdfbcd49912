"""The Python API: load a checkpoint, then generate, stream or chat. The CLI is a thin shell over this."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .engine import Engine, RequestOutput
from .engine.kv_pool import parse_size
from .engine.request import Logprob
from .errors import EngineError, InvalidParameterError
from .kernels.cpu import huge_page_weights
from .loaders.checkpoint import Checkpoint, default_dtype, load_model, parse_device, parse_dtype, resolve
from .loaders.quantize import check_quantization, quantize
from .model import Qwen3
from .parallel import check_shardable, check_size
from .results import Generation, GenerationStats, peak_memory
from .sampling import SamplingParams, derive_seed
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .engine.distributed import Leader

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


class Run:
    """Drives the engine until a set of requests has finished, collecting each one's tokens, text and logprobs; as an
    iterator it yields after every step. Closing it early (or an exception) aborts the requests left, so their blocks
    are freed."""

    def __init__(self, llm: "LLM", request_ids: list[str]) -> None:
        self.engine, self.tokenizer = llm.engine, llm.tokenizer
        self.ids = request_ids
        self.tokens: dict[str, list[int]] = {i: [] for i in request_ids}
        self.text: dict[str, list[str]] = {i: [] for i in request_ids}
        self.logprobs: dict[str, list[Logprob]] = {i: [] for i in request_ids}
        self.finished: dict[str, RequestOutput] = {}
        self.prompt_logprobs: dict[str, list] = {}
        self.requests = {i: llm.engine.requests[i] for i in request_ids}
        self.start = time.perf_counter()

    def __iter__(self) -> Iterator[list[RequestOutput]]:
        try:
            while len(self.finished) < len(self.ids):
                outputs = [o for o in self.engine.step() if o.request_id in self.tokens]
                if not outputs and not self.engine.has_unfinished():  # another caller stepped it (a server's loop)
                    lost = next(i for i in self.ids if i not in self.finished)
                    raise EngineError(f"request {lost} left the engine unseen: something else is stepping this engine.")
                for out in outputs:
                    self.tokens[out.request_id] += out.new_token_ids
                    self.text[out.request_id].append(out.text)
                    self.logprobs[out.request_id] += out.logprobs or []
                    if out.prompt_logprobs is not None:
                        self.prompt_logprobs[out.request_id] = out.prompt_logprobs
                    if out.finished:
                        self.finished[out.request_id] = out
                yield outputs
        finally:
            for request_id in self.ids:  # a step that failed has taken its requests out already
                if request_id not in self.finished and request_id in self.engine.requests:
                    self.engine.abort(request_id)

    def wait(self) -> list[Generation]:
        for _ in self:
            pass
        return [self.result(i) for i in self.ids]

    def result(self, request_id: str) -> Generation:
        request, out = self.requests[request_id], self.finished[request_id]
        memory, kind = peak_memory(self.engine.device)
        first = request.first_token_at or request.finished_at
        generated = len(self.tokens[request_id]) + (out.finish_reason == "stop")
        decode_s = request.finished_at - first
        stats = GenerationStats(
            prompt_tokens=request.prompt_len,
            new_tokens=len(self.tokens[request_id]),
            time_to_first_token_s=first - request.arrival,
            decode_tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            total_s=request.finished_at - request.arrival,
            peak_memory_bytes=memory,
            memory_kind=kind,
            cached_prompt_tokens=out.num_cached_tokens,
        )
        asked = request.params.logprobs is not None
        return Generation(
            self.tokenizer.decode(self.tokens[request_id]) if request.text is None else "".join(self.text[request_id]),
            self.tokens[request_id], out.finish_reason or "length", stats,
            self.logprobs[request_id] if asked else None, self.prompt_logprobs.get(request_id),
        )  # fmt: skip


class TextStream:
    """Iterates over text pieces as they are decoded; `result` holds the whole Generation once exhausted."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        (request_id,) = self._run.ids
        for outputs in self._run:
            for out in outputs:
                if out.text:
                    yield out.text
        self.result = self._run.result(request_id)


class LLM:
    """A loaded model, its tokenizer, its generation defaults, and the engine that runs every request on them.

    Engine options (kv_memory, max_running, max_batched_tokens, block_size, kernels) go to engine.Engine.
    """

    def __init__(
        self, model: Qwen3, tokenizer: Tokenizer, generation_config: dict | None = None, compile: bool = False,
        **engine_options: object,
    ) -> None:  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        eos = self.generation_config.get("eos_token_id", [])
        eos = {eos} if isinstance(eos, int) else set(eos)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        default_new = self.generation_config.get("max_new_tokens") or FALLBACK_MAX_NEW_TOKENS
        if self.model.norm.weight.device.type == "cpu":
            huge_page_weights(self.model)
        self.engine = Engine(
            self.model, tokenizer, self.eos_token_ids, compile=compile, default_max_new_tokens=default_new, **engine_options
        )

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (tensor_parallel_size > 1); nothing to do otherwise."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self._eos_token_ids = frozenset(ids)
        if hasattr(self, "engine"):
            self.engine.eos_ids = self._eos_token_ids

    def default_sampling(self) -> SamplingParams:
        return default_sampling(self.generation_config)

    def sampling_params(self, **overrides: object) -> SamplingParams:
        """Checkpoint defaults with the caller's non-None values on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self.default_sampling(), **given)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def start(self, prompts: list[list[int]], params: list[SamplingParams], stream: bool) -> Run:
        """Add every request to the engine (all or none: a refused one takes back the ones added before it). Not
        streamed, a request without stop strings is detokenized once at the end, not at every step."""
        added: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                added.append(self.engine.add_request(prompt, p, text=stream))
        except BaseException:
            for request_id in added:
                self.engine.abort(request_id)
            raise
        return Run(self, added)

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
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        n: int = 1,
        ignore_eos: bool | None = None,
        logprobs: int | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Generation | list[Generation] | list[list[Generation]]:
        """Generate for one prompt (text or token IDs), or for a list of them, all through the engine at once.

        With n > 1, each prompt gets n samples (their own seeds, derived from `seed`): a list for one prompt, a list of
        lists for several. params: SamplingParams for every prompt, or one per prompt, instead of the keywords
        (a max_new_tokens left None there is the checkpoint's default). ignore_eos generates max_new_tokens whatever
        comes (benchmarks).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"n must be an integer >= 1, not {n!r}.")
        batched = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        prompts = [self.encode_prompt(p) for p in (prompt if batched else [prompt])]
        if params is None:
            sampling = dict(
                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed, stop=stop,
                max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, logprobs=logprobs,
            )  # fmt: skip
            per_prompt = [self.sampling_params(**sampling)] * len(prompts)
        else:
            per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
            if len(per_prompt) != len(prompts) or not all(isinstance(p, SamplingParams) for p in per_prompt):
                raise InvalidParameterError(f"params must be one SamplingParams or one per prompt ({len(prompts)}).")
        requests = [(ids, sample_params(p, i)) for ids, p in zip(prompts, per_prompt) for i in range(n)]
        results = self.start([ids for ids, _ in requests], [p for _, p in requests], stream=False).wait()
        if n > 1:
            results = [results[i : i + n] for i in range(0, len(results), n)]
        return results if batched else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int | None = None, *, stop: str | Sequence[str] | None = None, **sampling: object) -> TextStream:
        """Like generate, for one prompt, yielding text pieces as soon as they are final."""
        params = self.sampling_params(max_new_tokens=max_new_tokens, stop=stop, **sampling)
        return TextStream(self.start([self.encode_prompt(prompt)], [params], stream=True))

    def chat_stream(self, messages: list[dict], enable_thinking: bool = True, max_new_tokens: int | None = None, **kwargs: object) -> "ChatStream":
        """Stream the assistant's reply as ("reasoning" | "answer", text) pieces. A conversation resent with one more
        turn finds its earlier turns in the prefix cache."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        return ChatStream(self.stream(prompt, max_new_tokens, **kwargs), opens_thinking(self.tokenizer, prompt))

    def chat(self, messages: list[dict], enable_thinking: bool = True, max_new_tokens: int | None = None, **kwargs: object) -> ChatResult:
        """One assistant turn: the answer and, apart from it, the reasoning."""
        stream = self.chat_stream(messages, enable_thinking, max_new_tokens, **kwargs)
        for _ in stream:
            pass
        return stream.result


def default_sampling(generation_config: dict) -> SamplingParams:
    """A checkpoint's own defaults (generation_config.json): greedy unless it says do_sample."""
    gen = generation_config
    if not gen.get("do_sample", False):
        return SamplingParams()
    return SamplingParams(
        temperature=gen.get("temperature", 1.0),
        top_k=gen.get("top_k") or 0,
        top_p=gen.get("top_p") or 1.0,
        min_p=gen.get("min_p") or 0.0,
        repetition_penalty=gen.get("repetition_penalty") or 1.0,
    )


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's token ids, from its text or as given; InvalidParameterError for an empty or malformed one."""
    if isinstance(prompt, str):
        try:
            ids = tokenizer.encode(prompt)
        except UnicodeEncodeError:
            raise InvalidParameterError("the prompt is not valid Unicode text (it holds a lone surrogate).") from None
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        ids = list(prompt)
    else:
        raise InvalidParameterError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}.")
    if not ids:
        raise InvalidParameterError("the prompt is empty.")
    return ids


def opens_thinking(tokenizer: Tokenizer, prompt: list[int]) -> bool:
    """Whether a chat prompt ends inside an open thinking block (some templates open it themselves), so that the reply
    starts with reasoning."""
    text = tokenizer.decode(prompt)
    return text.rfind(THINK_START) > text.rfind(THINK_END)


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index` of n: the first keeps the seed, the others draw from seeds derived from it."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=derive_seed(params.seed, index))


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
    tensor_parallel_size: int = 1,
    **engine_options: object,
) -> LLM:
    """Load a checkpoint folder, a Hub repo id, an alias ("base", "reasoning"), or a .gguf file (qwen3, qwen2).

    quantization="int8" stores the linear weights as int8 (per-channel scales), "int4" as Q4_K blocks (CPU only), with
    bf16 activations by default. A .gguf file's Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K layers stay as they are on a CPU
    (bf16 activations by default where the file is quantized).
    tensor_parallel_size=N splits every layer over N ranks (parallel.py): this process and N - 1 it starts, on the
    CUDA devices from `device` on (NCCL), or on the CPU (gloo); Hugging Face checkpoints only. close() stops them.
    engine_options: kv_memory (bytes or "8GiB"), max_running, max_batched_tokens, block_size, kernels (engine.Engine).
    The device, dtype, quantization and option names (and kv_memory's format) are checked before anything is read.
    """
    device = parse_device(device)
    dtype = parse_dtype(dtype)
    check_quantization(quantization, device)
    # Engine's own keyword options, less those LLM passes itself.
    options = [
        name for name, p in inspect.signature(Engine).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("compile", "default_max_new_tokens", "parallel")
    ]  # fmt: skip
    unknown = sorted(set(engine_options) - set(options))
    if unknown:
        raise InvalidParameterError(f"load() has no option {unknown[0]!r}; the engine options are {', '.join(options)}.")
    if engine_options.get("kv_memory") is not None:
        parse_size(engine_options["kv_memory"])
    if tensor_parallel_size != 1:
        return load_parallel(model, device, dtype, compile, quantization, tensor_parallel_size, engine_options)
    if str(model).lower().endswith(".gguf"):
        from .loaders import gguf  # imports the gguf package, for .gguf files only

        checkpoint = gguf.GGUFCheckpoint.open(model)
        tokenizer, read_weights, quantized = checkpoint.tokenizer(), gguf.load_model, checkpoint.quantized
    else:
        directory = resolve(str(model))
        checkpoint = Checkpoint.open(directory)
        tokenizer, read_weights, quantized = Tokenizer.from_dir(directory), load_model, False
    dtype = dtype or default_dtype(device, quantized or bool(quantization))
    weights = read_weights(checkpoint, device, dtype, huge_pages=not quantization)  # (quantized: placed after)
    if quantization:
        weights = quantize(weights, quantization)
    return LLM(weights, tokenizer, checkpoint.generation_config, compile=compile, **engine_options)


def load_parallel(
    model: str | Path, device: torch.device, dtype: torch.dtype | None, compile: bool, quantization: str | None,
    size: int, engine_options: dict,
) -> LLM:  # fmt: skip
    """load() with tensor_parallel_size=size: start the other ranks, then load this rank's shard beside them."""
    if str(model).lower().endswith(".gguf") or quantization:
        raise InvalidParameterError("tensor parallelism runs Hugging Face checkpoints (bf16, fp16 or fp32 weights), "
                                    "not GGUF files or quantized weights.")  # fmt: skip
    directory = resolve(str(model))
    weights, leader, checkpoint = load_shard(directory, device, dtype, size)
    try:
        return LLM(weights, Tokenizer.from_dir(directory), checkpoint.generation_config, compile=compile,
                   parallel=leader, **engine_options)  # fmt: skip
    except BaseException:
        leader.close()
        raise


def load_shard(directory: Path, device: torch.device, dtype: torch.dtype | None, size: int) -> tuple[Qwen3, Leader, Checkpoint]:
    """Rank 0's shard of a checkpoint folder's weights, and the other ranks started beside it, each loading its own
    (refused with one sentence where the model or the machine cannot be split `size` ways)."""
    from .engine.distributed import Leader  # starts processes: imported only where asked for

    check_size(size)
    if device.type not in ("cuda", "cpu"):
        raise InvalidParameterError(f"tensor parallelism runs on CUDA GPUs or on the CPU, not on {device.type}.")
    checkpoint = Checkpoint.open(directory)
    check_shardable(checkpoint.config, size)
    first = device.index or 0
    have = torch.cuda.device_count() - first if device.type == "cuda" else os.cpu_count() or 1
    if size > have:
        what = f"CUDA devices from cuda:{first} on" if device.type == "cuda" else "CPU cores"
        raise InvalidParameterError(f"tensor_parallel_size {size} is more than the {have} {what} this machine has.")
    dtype = dtype or default_dtype(device)
    leader = Leader.launch(size, directory, device, dtype, checkpoint.config.vocab_size)
    try:
        return load_model(checkpoint, device, dtype, shard=leader.shard), leader, checkpoint
    except BaseException:
        leader.close()
        raise
