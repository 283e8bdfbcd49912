"""The command line: output formats, errors as one sentence with a non-zero exit, the chat REPL."""

import io
import json
import subprocess
import sys

import pytest

from qwen3gen import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_text_and_stats(capsys, tiny_checkpoint, tiny_llm):
    code, out, err = run(capsys, "generate", "Explain large language models.", "--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0
    assert out == tiny_llm.generate("Explain large language models.", max_new_tokens=12, temperature=0.0).text + "\n"
    assert "12 new tokens" in err and "tok/s" in err and "TTFT" in err and "MiB" in err


def test_generate_json_and_stream(capsys, tiny_checkpoint):
    common = ["--model", str(tiny_checkpoint), "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "1", "--top-k", "40"]
    code, out, _ = run(capsys, "generate", "Hi", "--json", *common)
    result = json.loads(out)
    assert code == 0 and set(result) == {"text", "token_ids", "finish_reason", "stats"}
    assert len(result["token_ids"]) == 10 and result["finish_reason"] == "length"
    assert result["stats"]["new_tokens"] == 10
    code, streamed, _ = run(capsys, "generate", "Hi", "--stream", *common)
    assert code == 0 and streamed == result["text"] + "\n"


def test_prompt_from_stdin(capsys, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi"))
    code, out, _ = run(capsys, "generate", "-", "--model", str(tiny_checkpoint), "--max-new-tokens", "3", "--json", "--temperature", "0")
    assert code == 0 and json.loads(out)["stats"]["prompt_tokens"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-3"], "top_k must be an integer >= 0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--max-new-tokens", "100000"], "context of 512 tokens"),
        (["--dtype", "int3"], "dtype must be one of"),
    ],
)
def test_errors_are_one_sentence_and_exit_non_zero(capsys, tiny_checkpoint, args, message):
    code, out, err = run(capsys, "generate", "Hi", "--model", str(tiny_checkpoint), *args)
    assert code == 1 and out == ""
    assert err.startswith("qwen3gen: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_model_through_the_real_entry_point(tmp_path):
    """The installed console script: a bad path gives one line on stderr, exit 1, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3gen.cli", "generate", "Hi", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"qwen3gen: error: there is no checkpoint folder at {tmp_path / 'nope'}."


def test_download_fetches_only(capsys, monkeypatch, tmp_path):
    calls = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(tmp_path))
    code, out, _ = run(capsys, "download", "reasoning")
    assert code == 0 and calls == ["Qwen/Qwen3-0.6B"] and out.strip() == str(tmp_path)


def test_chat_repl_streams_and_keeps_history(capsys, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\n/reset\ny\nWhat is 2+2?\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "5", "--temperature", "0", "--no-think")
    assert code == 0
    assert out.count(">>> ") == 5  # two messages, an empty line, /reset (then its question) and /exit
    assert "forget the whole conversation? [y/N]" in out and "conversation cleared." in err
    assert err.count("5 new tokens") + err.count("tok/s") >= 2


def test_batch_file_and_samples(capsys, tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nExplain large language models.\n\n")
    code, out, err = run(capsys, "generate", "--batch", str(prompts), "-n", "2", "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--temperature", "0.9", "--seed", "5", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(x["prompt"], x["sample"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(len(x["token_ids"]) == 4 for x in lines) and "tok/s" in err


def test_samples_of_one_prompt_and_missing_prompt(capsys, tiny_checkpoint):
    code, out, _ = run(capsys, "generate", "Hi", "-n", "3", "--model", str(tiny_checkpoint), "--max-new-tokens", "4", "--temperature", "0.9", "--seed", "2", "--json")
    assert code == 0 and [json.loads(line)["sample"] for line in out.splitlines()] == [0, 1, 2]
    code, out, err = run(capsys, "generate", "-n", "2", "--model", str(tiny_checkpoint))
    assert code == 1 and err.strip() == "qwen3gen: error: give a PROMPT, or --batch FILE."


def test_help_and_version_answer_without_importing_torch():
    """--help and --version must come at once: nothing heavy is imported to build the parser or to read the version."""
    code = (
        "import sys, contextlib, io\n"
        "from qwen3gen import cli\n"
        "for flag in ('--help', '--version'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        cli.main([flag])\n"
        "    print(flag, out.getvalue().splitlines()[0])\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--help usage: qwen3gen" in proc.stdout and "--version qwen3gen 0.1.0" in proc.stdout
    assert "torch imported: False" in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])  # fmt: skip
def test_sampling_flags_fail_before_the_model_loads(tmp_path, capsys, flags, message):
    """The model path does not exist: had it been loaded first, the error would be about it."""
    assert cli.main(["generate", "Hi", "--model", str(tmp_path / "missing"), *flags]) == 1
    assert message in capsys.readouterr().err


def test_unreadable_prompt_sources_are_one_sentence(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--batch", str(tmp_path / "nope.txt")], f"cannot read {tmp_path / 'nope.txt'}: No such file or directory."),
        (["--batch", str(tmp_path)], f"{tmp_path} is a directory, not a file of prompts."),
        (["--batch", str(binary)], f"{binary} is not UTF-8 text (byte 3 is not valid UTF-8)."),
        (["--batch", str(empty)], f"{empty} holds no prompt."),
    ]
    for flags, message in cases:
        code, _, err = run(capsys, "generate", *flags, "--model", str(tiny_checkpoint), "--max-new-tokens", "2")
        assert code == 1 and err.strip() == f"qwen3gen: error: {message}"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad")))
    code, _, err = run(capsys, "generate", "-", "--model", str(tiny_checkpoint), "--max-new-tokens", "2")
    assert code == 1 and err.strip() == "qwen3gen: error: standard input is not UTF-8 text (byte 0 is not valid UTF-8)."


def test_generate_chat_applies_the_template(capsys, tiny_checkpoint, tiny_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = tiny_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = tiny_llm.generate(ids, max_new_tokens=6, temperature=0.0).text
    code, out, _ = run(capsys, "generate", "Hi", "--chat", "--system", "Be brief.", "--model", str(tiny_checkpoint),
                       "--max-new-tokens", "6", "--temperature", "0")  # fmt: skip
    assert code == 0 and out == expected + "\n"
    code, _, err = run(capsys, "generate", "Hi", "--system", "x", "--model", str(tiny_checkpoint))
    assert code == 1 and "--system goes with --chat" in err


def test_every_flag_has_help_text():
    import argparse

    def missing(parser: argparse.ArgumentParser, path: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += missing(sub, f"{path} {name}")
            elif not action.help:
                found.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return found

    assert missing(cli.build_parser(), "qwen3gen") == []
