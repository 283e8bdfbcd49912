"""Text <-> token IDs for Qwen3 checkpoints, chat-template rendering and streaming detokenization.

Only `tokenizers` and `jinja2` are used at run time, so the engine does not depend on transformers; the tests
check every result against transformers' `AutoTokenizer`, which is the behaviour users expect.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

from qwen3gen.errors import CheckpointError, InvalidParameterError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Older names for a message's reasoning; templates read `reasoning_content` (and gpt-oss style ones `thinking`).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"


class _TemplateRaised(Exception):
    """Raised by the template's `raise_exception(...)`, so it can be told apart from Jinja's own errors."""


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used by training-oriented templates) and renders the body.

    transformers uses the tag to build assistant-token masks; for inference it is just a pass-through, but without
    it such templates would not even compile.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Plain `json.dumps`: Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`, which would change the prompt."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str, origin: Path) -> jinja2.Template:
    """Compile with the same environment transformers uses, so a checkpoint's template renders identically."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CheckpointError(
            f"The chat template in {origin} is not valid Jinja: {exc.message} (line {exc.lineno})."
        ) from exc


def _prepare_message(message: dict[str, Any]) -> dict[str, Any]:
    """Mirror transformers' message clean-up: drop keys set to None and alias the reasoning field names."""
    if not isinstance(message, dict):
        raise InvalidParameterError(f"Chat messages must be dicts with 'role' and 'content', got {message!r}.")
    cleaned = {key: value for key, value in message.items() if value is not None}
    reasoning = next((cleaned[key] for key in _REASONING_KEYS if key in cleaned), None)
    if reasoning is not None:
        cleaned = {"thinking": reasoning, **cleaned, "reasoning_content": reasoning}
    return cleaned


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text.") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are either strings or serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A checkpoint's byte-level BPE tokenizer plus its chat template and special tokens."""

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        template_origin: Path | None = None,
    ) -> None:
        self._backend = backend
        # Passed to the template as variables (eos_token, ...), like transformers' special_tokens_map.
        self._special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._template_origin = template_origin or Path("<chat_template>")
        self._compiled_template = (
            _compile_chat_template(chat_template, self._template_origin) if chat_template is not None else None
        )
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.pad_token_id = self._special_id("pad_token")

    def __reduce__(self) -> tuple:
        """Pickled as what built it (the server's engine process sends its tokenizer to the HTTP side): a compiled
        template does not pickle, so it is compiled again."""
        options = {"special_tokens": self._special_tokens, "chat_template": self.chat_template,
                   "template_origin": self._template_origin}  # fmt: skip
        return _rebuild_tokenizer, (self._backend, options)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, plus tokenizer_config.json and chat_template.jinja when the checkpoint has them."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        raw = _read_text(tokenizer_file)
        try:
            backend = _BackendTokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
            raise CheckpointError(f"{tokenizer_file} is not a valid tokenizers file ({exc}).") from exc

        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        special_tokens = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                special_tokens[key] = content

        # Newer Hugging Face saves keep the template in its own file, which takes precedence over the config's.
        template_file = directory / "chat_template.jinja"
        if template_file.exists():
            chat_template = _read_text(template_file)
            origin = template_file
        else:
            chat_template = config.get("chat_template")
            origin = config_file
            if chat_template is not None and not isinstance(chat_template, str):
                raise CheckpointError(f"The chat_template in {config_file} must be a single Jinja string.")

        tokenizer = cls(backend, special_tokens=special_tokens, chat_template=chat_template, template_origin=origin)
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in special_tokens and getattr(tokenizer, f"{key}_id") is None:
                raise CheckpointError(
                    f"{config_file} names {key} {special_tokens[key]!r}, which is not in {tokenizer_file}."
                )
        return tokenizer

    def _special_id(self, key: str) -> int | None:
        token = self._special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Size of the ID space, added tokens included (what the embedding must cover)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token IDs for `text`; special-token strings in it map to their single IDs.

        add_special_tokens applies tokenizer.json's post-processor, as transformers does: nothing for Qwen,
        a BOS for checkpoints such as DeepSeek-R1-Distill-Qwen. A chat template writes its own, so it uses False.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`; incomplete UTF-8 byte sequences come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """ID of a vocabulary or added token (e.g. a stop string like "<|im_end|>"), or None if there is none."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render the conversation with the checkpoint's own template (e.g. `enable_thinking=False` as a kwarg).

        Returns the token IDs of the prompt, or the prompt text when `tokenize` is False.
        """
        if self._compiled_template is None:
            raise CheckpointError("This checkpoint has no chat template, so chat messages cannot be formatted.")
        if not messages:
            raise InvalidParameterError("Cannot apply the chat template to an empty conversation.")
        variables = {**self._special_tokens, **template_kwargs}
        try:
            text = self._compiled_template.render(
                messages=[_prepare_message(message) for message in messages],
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateRaised as exc:
            raise InvalidParameterError(str(exc)) from exc
        except jinja2.TemplateError as exc:
            raise InvalidParameterError(f"The chat template could not render these messages: {exc}.") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _rebuild_tokenizer(backend: _BackendTokenizer, options: dict[str, Any]) -> Tokenizer:
    return Tokenizer(backend, **options)


class IncrementalDetokenizer:
    """Turns a stream of token IDs into text pieces for streaming.

    Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is only released once the decoded
    window no longer ends in U+FFFD. Only a small window of IDs is kept and decoded: `_ids[:_read]` is the already
    released context (decoded again so tokenizers whose decoding depends on the preceding token stay correct) and
    `_ids[_read:]` are the IDs whose text is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _step(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith(_REPLACEMENT_CHAR):
            return ""
        released = text[len(self._decode(self._ids[: self._read])) :]
        # The released IDs become the context of the next window; anything before them is never needed again.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return released

    def push(self, ids: Iterable[int]) -> str:
        """Add IDs and return the text that is now final (possibly empty)."""
        # One ID at a time, so a batch ending inside a character still releases everything before it.
        return "".join(self._step(token_id) for token_id in ids)

    def flush(self) -> str:
        """Return whatever is held back (U+FFFD for a character that never completed) and end the stream."""
        remainder = self._decode(self._ids)[len(self._decode(self._ids[: self._read])) :]
        self._ids.clear()
        self._read = 0
        return remainder
