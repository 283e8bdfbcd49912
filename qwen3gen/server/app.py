"""The OpenAI-compatible HTTP API over one loaded model: chat and text completions (streamed as server-sent events or
not), models, health, tokenize and detokenize. The handlers only add, stream and abort requests: the engine runs in
a process of its own (engine_process.py). Every failure a client can cause is an OpenAI error object with a 4xx status.
/metrics is Prometheus' text format (metrics.py); / is a chat page (static/chat.html: no build step, no CDN)."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine import RequestOutput
from ..errors import ContextLengthError, EngineError, InvalidParameterError, OutOfMemoryError, QueueFullError
from ..llm import ReasoningSplitter, default_sampling, encode_prompt, opens_thinking, sample_params
from ..sampling import SamplingParams
from .engine_process import EngineFailure, EngineProcess
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

MAX_BODY_BYTES = 4 << 20
DISCONNECT_POLL_S = 0.25  # how often a request answered only at its end checks that its client is still there
OPEN_PATHS = ("/health", "/metrics", "/")  # answered without the API key


class APIError(Exception):
    """An OpenAI error object with its status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


REFUSALS = {  # the engine's refusals of a request, as the client's fault
    InvalidParameterError: (400, "invalid_request_error", None),
    ContextLengthError: (400, "invalid_request_error", "context_length_exceeded"),
    OutOfMemoryError: (400, "invalid_request_error", "kv_cache_too_small"),
    QueueFullError: (429, "rate_limit_error", "queue_full"),
    EngineError: (503, "server_error", None),
}


class Guard:
    """Refuses, before the body is read, a body over MAX_BODY_BYTES (413) and a missing or wrong API key (401). A
    plain ASGI middleware: the handlers still see their client's disconnect, which a BaseHTTPMiddleware hides."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            size = headers.get("content-length")
            refusal = None
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
                message = f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB."
                refusal = APIError(413, message, code="request_too_large")
            elif self.api_key is not None and scope["path"] not in OPEN_PATHS:
                given = headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                    message = "the API key is missing or wrong (Authorization: Bearer KEY)."
                    refusal = APIError(401, message, code="invalid_api_key")
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class Choice:
    """One request's output so far: the text as it streams, its tokens, logprobs and end."""

    index: int
    prompt_index: int
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    last_output_at: float = field(default_factory=time.perf_counter)  # arrival, then each output


def coalesced(items: list) -> list:
    """Queued outputs with those of one request merged, in the order each request first appears; a failure ends the
    list (it ends the response)."""
    merged: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, EngineFailure):
            return [*merged.values(), item]
        before = merged.get(item.request_id)
        merged[item.request_id] = item if before is None else before.followed_by(item)
    return list(merged.values())


def create_app(engine: EngineProcess, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app for the model of a started engine process, answering to `model_name`; the process stops with the app."""
    tokenizer, context, generation_config = engine.model.tokenizer, engine.model.context, engine.model.generation_config
    created = int(time.time())
    app = FastAPI(title="qwen3gen", docs_url=None, redoc_url=None)
    metrics = Metrics(lambda: engine.last_stats)
    app.router.add_event_handler("shutdown", engine.stop)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON.").response()
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}."
        return APIError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = None if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), code=code).response()

    app.add_middleware(Guard, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            message = f"the model {name!r} does not exist; this server serves {model_name!r}."
            raise APIError(404, message, param="model", code="model_not_found")

    def params_of(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        try:
            return body.params(default_sampling(generation_config))
        except InvalidParameterError as error:
            raise APIError(400, str(error)) from None

    def encode(prompt: str | list[int]) -> list[int]:
        try:
            return encode_prompt(tokenizer, prompt)
        except InvalidParameterError as error:
            raise APIError(400, str(error), param="prompt") from None

    async def submit(
        prompts: list[list[int]], params: SamplingParams, n: int
    ) -> tuple[dict[str, Choice], asyncio.Queue]:  # fmt: skip
        """Every (prompt, sample) pair as a request of its own, all feeding one queue; all or none are added."""
        queue: asyncio.Queue = asyncio.Queue()
        choices: dict[str, Choice] = {}
        try:
            for p, prompt in enumerate(prompts):
                for i in range(n):
                    request_id = uuid.uuid4().hex
                    await engine.add(request_id, prompt, sample_params(params, i), queue)
                    choices[request_id] = Choice(p * n + i, p, len(prompt))
        except tuple(REFUSALS) as error:
            abort(choices)
            status, kind, code = next(v for t, v in REFUSALS.items() if isinstance(error, t))
            raise APIError(status, str(error), kind, code=code) from None
        return choices, queue

    def abort(choices: dict[str, Choice]) -> None:
        for request_id, choice in choices.items():
            if choice.finish_reason is None:
                engine.abort(request_id)
                choice.finish_reason = "abort"
                metrics.finished("abort", choice.prompt_tokens)

    async def outputs(
        choices: dict[str, Choice], queue: asyncio.Queue, client: Request | None = None
    ) -> AsyncIterator[tuple[Choice, RequestOutput]]:  # fmt: skip
        """Each output as it comes, with its choice brought up to date; aborts what is left if the caller stops, or,
        given the client's request (a response sent only at the end), once the client has gone. The outputs of one
        request that have queued up while the caller was busy come as one (fewer, larger events when behind)."""
        left, checked = len(choices), time.perf_counter()
        try:
            while left:
                if client is not None and time.perf_counter() - checked > DISCONNECT_POLL_S:
                    checked = time.perf_counter()
                    if await client.is_disconnected():
                        return
                try:
                    first = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S) if client else await queue.get()
                except asyncio.TimeoutError:
                    continue
                for item in coalesced([first] + [queue.get_nowait() for _ in range(queue.qsize())]):
                    if isinstance(item, EngineFailure):
                        raise APIError(500, item.message, "server_error")
                    choice, now = choices[item.request_id], time.perf_counter()
                    metrics.tokens(len(item.new_token_ids), now - choice.last_output_at, first=not choice.tokens)
                    choice.last_output_at = now
                    choice.tokens += item.new_token_ids
                    choice.logprobs += item.logprobs or []
                    choice.cached_tokens = item.num_cached_tokens
                    if item.finished:
                        choice.finish_reason = "length" if item.finish_reason == "length" else "stop"
                        metrics.finished(choice.finish_reason, choice.prompt_tokens)
                        left -= 1
                    yield choice, item
        finally:
            abort(choices)

    def usage(choices: dict[str, Choice]) -> dict:
        prompt = sum({c.prompt_index: c.prompt_tokens for c in choices.values()}.values())  # once for its n samples
        completion = sum(len(c.tokens) for c in choices.values())
        cached = sum(c.cached_tokens for c in choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def chat_logprobs(entries: list) -> dict:
        def one(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in top]} for t, lp, top in entries]}

    def completion_logprobs(entries: list) -> dict:
        tokens = [token_text(t) for t, _, _ in entries]
        offsets = list(itertools.accumulate(map(len, tokens), initial=0))[:-1]
        tops = [{token_text(a): v for a, v in top} for _, _, top in entries]
        chosen = [lp for _, lp, _ in entries]
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        """Server-sent events; a failure after the first event (the status is sent) ends the stream with an error
        event."""

        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            except APIError as error:
                yield sse(error.body())

        return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    page = (resources.files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        if not engine.alive:
            raise APIError(503, "the engine process has stopped.", "server_error", code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        await engine.current_stats()  # brings engine.last_stats up to date
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "qwen3gen"}
        card["max_model_len"] = context
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages.", param="prompt")
        if body.messages is not None:
            messages = [m.for_template() for m in body.messages]
            tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(tokens), "max_model_len": context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        if any(not 0 <= t < engine.model.vocab_size for t in body.tokens):
            raise APIError(400, "a token id is outside the vocabulary.", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, client: Request):  # noqa: ANN202
        check_model(body.model)
        params = params_of(body)
        texts = body.prompts()
        if not texts:
            raise APIError(400, "the prompt list is empty.", param="prompt")
        prompts = [encode(p) for p in texts]
        echoed = [p if isinstance(p, str) else tokenizer.decode(p) for p in texts] if body.echo else None
        choices, queue = await submit(prompts, params, body.n)
        completion_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "object": "text_completion", "created": now, "model": model_name}

        def choice_body(choice: Choice, text: str, logprobs: list | None) -> dict:
            lp = completion_logprobs(logprobs) if body.logprobs is not None and logprobs is not None else None
            return {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": choice.finish_reason}

        if not body.stream:
            async for choice, out in outputs(choices, queue, client):
                choice.text.append(out.text)
            ordered = sorted(choices.values(), key=lambda c: c.index)
            prefix = lambda c: echoed[c.prompt_index] if echoed else ""  # noqa: E731
            return {**head, "choices": [choice_body(c, prefix(c) + "".join(c.text), c.logprobs) for c in ordered],
                    "usage": usage(choices)}  # fmt: skip

        async def events() -> AsyncIterator[str]:
            if echoed:
                for choice in sorted(choices.values(), key=lambda c: c.index):
                    yield sse({**head, "choices": [choice_body(choice, echoed[choice.prompt_index], None)]})
            async for choice, out in outputs(choices, queue):
                if out.text or out.new_token_ids or out.finished:
                    yield sse({**head, "choices": [choice_body(choice, out.text, out.logprobs or [])]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": usage(choices)})
            yield sse("[DONE]")

        return stream_response(events())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, client: Request):  # noqa: ANN202
        check_model(body.model)
        params = params_of(body)
        options = dict(body.chat_template_kwargs or {})
        try:
            messages = [m.for_template() for m in body.messages]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **options)
        except Exception as error:  # the template raised (a role it does not know, a malformed turn)
            raise APIError(400, f"the chat template cannot render these messages: {error}", param="messages") from None
        choices, queue = await submit([prompt], params, body.n)
        thinking = opens_thinking(tokenizer, prompt)
        splitters = {c.index: ReasoningSplitter(thinking) for c in choices.values()}
        completion_id, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "created": now, "model": model_name}

        def pieces(choice: Choice, out: RequestOutput) -> list[tuple[str, str]]:
            splitter = splitters[choice.index]
            return splitter.feed(out.text) + (splitter.flush() if out.finished else [])

        if not body.stream:
            parts = {c.index: {"reasoning": [], "answer": []} for c in choices.values()}
            async for choice, out in outputs(choices, queue, client):
                for kind, piece in pieces(choice, out):
                    parts[choice.index][kind].append(piece)
            result = []
            for choice in sorted(choices.values(), key=lambda c: c.index):
                reasoning = "".join(parts[choice.index]["reasoning"]).strip() or None
                message = {"role": "assistant", "content": "".join(parts[choice.index]["answer"]).strip(),
                           "reasoning_content": reasoning, "reasoning": reasoning}  # fmt: skip
                lp = chat_logprobs(choice.logprobs) if body.logprobs else None
                finish = choice.finish_reason
                result.append({"index": choice.index, "message": message, "logprobs": lp, "finish_reason": finish})
            return {**head, "object": "chat.completion", "choices": result, "usage": usage(choices)}

        async def events() -> AsyncIterator[str]:
            def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> str:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

            for choice in sorted(choices.values(), key=lambda c: c.index):
                yield chunk(choice.index, {"role": "assistant", "content": ""})
            async for choice, out in outputs(choices, queue):
                deltas = []
                for kind, piece in pieces(choice, out):
                    reasoning = {"reasoning_content": piece, "reasoning": piece}
                    deltas.append(reasoning if kind == "reasoning" else {"content": piece})
                lp = chat_logprobs(out.logprobs or []) if body.logprobs and out.logprobs else None
                for i, delta in enumerate(deltas or ([{}] if lp else [])):
                    yield chunk(choice.index, delta, lp if i == 0 else None)
                if out.finished:
                    yield chunk(choice.index, {}, finish=choice.finish_reason)
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(choices)})
            yield sse("[DONE]")

        return stream_response(events())

    return app
