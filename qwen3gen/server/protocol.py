"""The OpenAI request bodies the server accepts, as pydantic models (what a field may hold is checked here; what the
values must satisfy is SamplingParams' check), and their sampling parameters."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields chat and text completions share. Unknown fields (user, metadata, ...) are ignored, as OpenAI-style
    servers do; None means the checkpoint's default (generation_config.json)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def sampling(self, defaults: SamplingParams, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        given = dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=self.stop, max_new_tokens=max_tokens,
            ignore_eos=self.ignore_eos or None, logprobs=logprobs,
        )  # fmt: skip
        return replace(defaults, **{k: v for k, v in given.items() if v is not None})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls and names pass through to the chat template

    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None

    def params(self, defaults: SamplingParams) -> SamplingParams:
        top = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling(defaults, self.max_completion_tokens or self.max_tokens, top)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def params(self, defaults: SamplingParams) -> SamplingParams:
        return self.sampling(defaults, self.max_tokens, self.logprobs)

    def prompts(self) -> list[str | list[int]]:
        """One or several prompts, text or token IDs."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
