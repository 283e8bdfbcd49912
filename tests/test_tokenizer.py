"""qwen3gen.tokenizer against transformers' AutoTokenizer on the real Qwen3 tokenizer files."""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from qwen3gen.errors import CheckpointError, InvalidParameterError
from qwen3gen.tokenizer import IncrementalDetokenizer, Tokenizer

PYTHON_CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
\treturn fib(n - 1) + fib(n - 2)   

class A:
        def f(self):  pass
'''

TEXTS = {
    "empty": "",
    "plain": "Explain large language models.",
    "code": PYTHON_CODE,
    "emoji": "I love 🦀 and 🐍! 😀😃😄 👍🏽 ❤️",
    "emoji_zwj": "Family: 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, technologist 👩🏾‍💻",
    "flags": "Flags: 🇫🇷🇯🇵🇺🇸🇧🇷 and 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "cjk": "大型语言模型是一种人工智能。日本語のテキスト、한국어 텍스트。𠀀𪚥",
    "whitespace": "a  b   c\t\td\n\n\ne \t \n  f    ",
    "only_whitespace": "   \n\t  \n",
    "trailing_spaces": "trailing spaces   ",
    "leading_newlines": "\n\nleading",
    "accents_nfc": unicodedata.normalize("NFC", "Café naïve résumé Ångström Ελληνικά"),
    "accents_nfd": unicodedata.normalize("NFD", "Café naïve résumé Ångström Ελληνικά"),
    "numbers": "3.14159 1,000,000 12345678901234567890 -42 1e-9 0x1F 2024-05-01",
    "special_tokens": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello<|endoftext|>"
    ),
    "special_glued": "x<|im_end|><|im_end|>y<think></think>z<|endoftext|>",
    "fake_special": "<|im_start |> <|im_end <think >",
    "mixed": "Résumé: 中文 + emoji 🎉 + code `x = 1`\n\t<think>ok</think>",
    "replacement_char": "bad \ufffd char",
}


@pytest.fixture(scope="module")
def reference(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def reference_chat_ids(reference, messages, **kwargs) -> list[int]:
    """transformers 5 returns a BatchEncoding for tokenize=True; older versions a plain list."""
    out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
    ids = out["input_ids"] if not isinstance(out, list) else out
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    return ids


# --- encode / decode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_decode_match_transformers(tok: Tokenizer, reference, name: str):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == reference.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_nfc_normalization_makes_nfd_and_nfc_encode_alike(tok: Tokenizer):
    assert tok.encode(TEXTS["accents_nfd"]) == tok.encode(TEXTS["accents_nfc"])


def test_known_encoding(tok: Tokenizer):
    assert tok.encode("Explain large language models.") == [840, 20772, 3460, 4128, 4119, 13]


def test_special_tokens_in_text_become_single_ids(tok: Tokenizer):
    ids = tok.encode(TEXTS["special_glued"])
    for token_id in (151643, 151645, 151667, 151668):
        assert token_id in ids
    assert ids.count(151645) == 2
    assert tok.decode(ids) == TEXTS["special_glued"]
    assert tok.decode(ids, skip_special_tokens=True) == "xy<think></think>z"


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<think>", 151667),
        ("</think>", 151668),
    ],
)
def test_special_ids(tok: Tokenizer, reference, token: str, token_id: int):
    assert tok.token_to_id(token) == token_id == reference.convert_tokens_to_ids(token)
    assert tok.encode(token) == [token_id]
    assert tok.decode([token_id]) == token


def test_token_to_id_unknown(tok: Tokenizer):
    assert tok.token_to_id("<|no such token|>") is None


def test_vocab_and_special_token_ids(tok: Tokenizer, reference):
    assert tok.vocab_size == len(reference) == 151669
    assert tok.eos_token_id == reference.eos_token_id == 151645
    assert tok.pad_token_id == reference.pad_token_id == 151643
    assert tok.bos_token_id is None and reference.bos_token_id is None
    assert tok.chat_template == reference.chat_template


# --- chat template ---------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city. Returns <temp> & 'conditions'.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Explain large language models."}],
    "system": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help? 😀"},
        {"role": "user", "content": "Write a haiku about 中文."},
    ],
    "reasoning_content": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "\nThree plus three is six.\n"},
    ],
    "inline_think": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>Add them.</think>6"},
    ],
    "reasoning_alias_and_none": [
        {"role": "user", "content": "Q?"},
        {
            "role": "assistant",
            "content": "A.",
            "reasoning_content": None,
            "thinking": "Thought via the 'thinking' key.",
            "tool_calls": None,
        },
    ],
    "tool_call": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                }
            ],
        },
        {"role": "tool", "content": json.dumps({"temp": 21, "conditions": "sunny"})},
        {"role": "assistant", "content": "It is 21 °C and sunny in Paris."},
        {"role": "user", "content": "Thanks!"},
    ],
}

THINKING = {"unspecified": {}, "on": {"enable_thinking": True}, "off": {"enable_thinking": False}}


@pytest.mark.parametrize("thinking", sorted(THINKING))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, reference, name, add_generation_prompt, thinking):
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL] if name == "tool_call" else None
    kwargs = {"add_generation_prompt": add_generation_prompt, "tools": tools, **THINKING[thinking]}
    expected_text = reference.apply_chat_template(messages, tokenize=False, **kwargs)
    assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == expected_text
    assert tok.apply_chat_template(messages, **kwargs) == reference_chat_ids(reference, messages, **kwargs)


def test_chat_template_tools_without_tool_call(tok, reference):
    messages = CONVERSATIONS["system"]
    expected = reference_chat_ids(reference, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    text = tok.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    # tojson must not HTML-escape, as Jinja's built-in filter would
    assert "Returns <temp> & 'conditions'." in text and "Zürich" in text
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == expected


def test_chat_template_shape(tok):
    ids = tok.apply_chat_template(CONVERSATIONS["single_user"], enable_thinking=False)
    assert ids[0] == 151644
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids[-4:] == tok.encode("<think>\n\n</think>\n\n")


def test_chat_template_does_not_change_messages(tok):
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A", "reasoning": "r", "x": None}]
    snapshot = json.loads(json.dumps(messages))
    tok.apply_chat_template(messages)
    assert messages == snapshot


def test_template_render_error_is_invalid_parameter(tok, reference):
    # An OpenAI-style assistant message with content=None: transformers drops the key and the template fails on it
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    ]
    with pytest.raises(Exception, match="content"):
        reference.apply_chat_template(messages, tokenize=False)
    with pytest.raises(InvalidParameterError, match="content"):
        tok.apply_chat_template(messages)
    with pytest.raises(InvalidParameterError):
        tok.apply_chat_template([])


def test_chat_template_is_compiled_once(tok, monkeypatch):
    import jinja2

    def fail(*args, **kwargs):
        raise AssertionError("the chat template was compiled again")

    monkeypatch.setattr(jinja2.Environment, "from_string", fail)
    assert tok.apply_chat_template(CONVERSATIONS["single_user"])


def write_checkpoint(tokenizer_dir: Path, dest: Path, config_update: dict | None = None) -> Path:
    shutil.copy(tokenizer_dir / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for key, value in (config_update or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def test_raise_exception_becomes_invalid_parameter(tokenizer_dir, tmp_path):
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('First message must be from the user.') }}{% endif %}ok"
    )
    tok = Tokenizer.from_dir(write_checkpoint(tokenizer_dir, tmp_path, {"chat_template": template}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "ok"
    with pytest.raises(InvalidParameterError, match=r"^First message must be from the user\.$"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_helpers_and_special_token_variables(tokenizer_dir, tmp_path, reference):
    template = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}"
        "|{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ strftime_now('%Y') | length }}"
        "|{{ {'a': '<&>'} | tojson }}|{{ custom }}\n"
        "    {% if true %}\n  indented\n    {% endif %}\n{{ messages[0].missing is defined }}"
    )
    tok = Tokenizer.from_dir(write_checkpoint(tokenizer_dir, tmp_path, {"chat_template": template}))
    messages = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    text = tok.apply_chat_template(messages, tokenize=False, custom="<|im_end|>")
    assert text == reference.apply_chat_template(messages, tokenize=False, chat_template=template, custom="<|im_end|>")
    # trim_blocks and lstrip_blocks remove the block tags' lines entirely
    assert text == 'one|<|im_end|>|<|endoftext|>|False|4|{"a": "<&>"}|<|im_end|>\n  indented\nFalse'
    assert 151645 in tok.apply_chat_template(messages, custom="<|im_end|>")


def test_chat_template_jinja_file_takes_precedence(tokenizer_dir, tmp_path):
    write_checkpoint(tokenizer_dir, tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "{{ messages[0].content }}!"
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "hey!"


def test_template_sandbox(tokenizer_dir, tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_dir(write_checkpoint(tokenizer_dir, tmp_path, {"chat_template": template}))
    with pytest.raises(InvalidParameterError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(tokenizer_dir, tmp_path):
    tok = Tokenizer.from_dir(write_checkpoint(tokenizer_dir, tmp_path, {"chat_template": None}))
    assert tok.chat_template is None
    with pytest.raises(CheckpointError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_invalid_chat_template_syntax(tokenizer_dir, tmp_path):
    write_checkpoint(tokenizer_dir, tmp_path, {"chat_template": "{% for m in messages %}"})
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_without_config(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Explain large language models.") == [840, 20772, 3460, 4128, 4119, 13]
    assert tok.eos_token_id is None and tok.pad_token_id is None and tok.chat_template is None


def test_special_tokens_as_added_token_dicts(tokenizer_dir, tmp_path):
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    tok = Tokenizer.from_dir(write_checkpoint(tokenizer_dir, tmp_path, {"eos_token": eos}))
    assert tok.eos_token_id == 151645


# --- from_dir errors -------------------------------------------------------------------------------------------


def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": ', "not json at all", "[]", "\xff\xfe"])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_eos_token(tokenizer_dir, tmp_path):
    write_checkpoint(tokenizer_dir, tmp_path, {"eos_token": "<|not a token|>"})
    with pytest.raises(CheckpointError, match="eos_token"):
        Tokenizer.from_dir(tmp_path)


def test_qwen3gen_does_not_import_transformers():
    import ast

    source = (Path(__file__).resolve().parent.parent / "qwen3gen" / "tokenizer.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "transformers" not in imported
    stdlib = {"__future__", "json", "collections", "datetime", "pathlib", "typing"}
    assert imported <= stdlib | {"jinja2", "tokenizers", "qwen3gen"}


# --- IncrementalDetokenizer ------------------------------------------------------------------------------------

STREAM_TEXTS = ["emoji", "emoji_zwj", "flags", "cjk", "mixed", "code", "special_tokens", "accents_nfc"]


def split_char_ids(tok: Tokenizer, text: str) -> list[int]:
    """The IDs of `text`, checked to contain tokens that hold only part of a UTF-8 character."""
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split a character across tokens"
    return ids


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("name", STREAM_TEXTS)
def test_stream_one_id_at_a_time(tok: Tokenizer, name: str, skip_special_tokens: bool):
    ids = tok.encode(TEXTS[name])
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    tail = detok.flush()
    assert tail == ""
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_emits_promptly(tok: Tokenizer):
    ids = split_char_ids(tok, "🫠 melt 𪚥 ok 🦀")
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    last_complete = 0
    for n, token_id in enumerate(ids, start=1):
        emitted += detok.push([token_id])
        if not tok.decode(ids[:n]).endswith("\ufffd"):
            last_complete = n
        # Held back only while the text ends inside a character, and released as soon as it is complete
        assert emitted == tok.decode(ids[:last_complete])
    assert emitted + detok.flush() == tok.decode(ids)


def test_stream_many_ids_at_once(tok: Tokenizer):
    text = TEXTS["emoji_zwj"] + TEXTS["cjk"] + TEXTS["flags"]
    ids = split_char_ids(tok, text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(ids[start : start + 3]) for start in range(0, len(ids), 3)]
    pieces.append(detok.push(iter([])))
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detok.flush() == text == tok.decode(ids)

    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids) + detok.flush() == text


def test_stream_truncated_character(tok: Tokenizer):
    ids = split_char_ids(tok, "ok 🫠")
    # Drop the last byte-token of the emoji, so the stream ends inside a character
    truncated = ids[:-1]
    assert tok.decode(truncated).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in truncated]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces).startswith("ok")
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert "".join(pieces) + tail == tok.decode(truncated)


def test_stream_invalid_bytes_in_the_middle(tok: Tokenizer):
    ids = split_char_ids(tok, "ok 🫠")
    broken = ids[:-1] + tok.encode(" after 中文")
    expected = tok.decode(broken)
    assert "\ufffd" in expected
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push([i]) for i in broken) + detok.flush() == expected


def test_stream_window_stays_small(tok: Tokenizer):
    ids = tok.encode(TEXTS["code"] * 20 + TEXTS["emoji"])
    detok = IncrementalDetokenizer(tok)
    calls = []
    original = tok.decode

    def counting_decode(seq, skip_special_tokens=False):
        calls.append(len(seq))
        return original(seq, skip_special_tokens)

    tok.decode = counting_decode  # instance attribute, shadows the method only for this object
    try:
        out = "".join(detok.push([i]) for i in ids) + detok.flush()
    finally:
        del tok.decode
    assert out == tok.decode(ids)
    assert max(calls) <= 8


def test_bos_from_the_post_processor_like_transformers(tmp_path, tokenizer_dir):
    """A tokenizer.json whose post-processor adds a BOS (DeepSeek-R1-Distill-Qwen style): encode adds it, the chat template does not double it."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config["bos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_dir(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("Hello world") == reference.encode("Hello world") == [151643, 9707, 1879]
    messages = [{"role": "user", "content": "Hello world"}]
    expected = reference.apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if not isinstance(expected, list) else expected
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == list(expected) == [151643, 9707, 1879]
