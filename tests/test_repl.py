"""The chat REPL keeps its session through Ctrl-C, errors and a history longer than the context, and has its
commands; driven through a scripted input function on the tiny checkpoint."""

import pytest

from qwen3gen.repl import ChatSession


def script(*lines):
    """An input() that returns the lines in turn; a KeyboardInterrupt or EOFError in the list is raised instead."""
    items = iter(lines)

    def read(prompt: str) -> str:
        item = next(items, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def session(llm, *lines, **sampling) -> ChatSession:
    return ChatSession(llm, None, False, {"temperature": 0.0, "max_new_tokens": 4, **sampling}, read=script(*lines))


def test_commands(tiny_llm, capsys):
    lines = ["/help", "/system Be brief.", "/think on", "Hi", "/reset", "n", "/bogus", "/reset", "yes", "/exit"]
    chat = session(tiny_llm, *lines)
    chat.run()
    out, err = capsys.readouterr()
    assert "/system TEXT" in out and "system prompt set." in err and "thinking on." in err
    assert "unknown command '/bogus'" in err and err.count("conversation cleared.") == 1
    assert chat.history == [] and chat.system == "Be brief." and chat.thinking


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_llm, capsys, monkeypatch):
    real = tiny_llm.chat_stream
    calls = []

    def interrupted(*args, **kwargs):
        stream = real(*args, **kwargs)
        calls.append(1)

        class Stopping:
            result = None

            def __iter__(self):
                for i, piece in enumerate(stream):
                    if i == 1 and len(calls) == 1:
                        raise KeyboardInterrupt  # as a Ctrl-C while the reply is printed
                    yield piece
                self.result = stream.result

        return Stopping()

    monkeypatch.setattr(tiny_llm, "chat_stream", interrupted)
    chat = session(tiny_llm, "Tell me a story.", "And another?", max_new_tokens=12)
    chat.run()
    err = capsys.readouterr().err
    assert "[stopped]" in err and len(chat.history) == 4  # both turns kept, the stopped one with its partial answer
    assert not tiny_llm.engine.has_unfinished() and tiny_llm.engine.stats()["kv_blocks_used"] == 0


def test_ctrl_c_twice_at_the_prompt_quits(tiny_llm, capsys):
    chat = session(tiny_llm, KeyboardInterrupt(), "Hi", KeyboardInterrupt(), KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        chat.run()
    err = capsys.readouterr().err
    assert err.count("(Ctrl-C again, or Ctrl-D, quits)") == 2 and len(chat.history) == 2


def test_long_history_loses_its_oldest_turns_and_errors_keep_the_session(tiny_llm, capsys):
    long = " ".join(["word"] * 150)
    chat = session(tiny_llm, long, long, long, " ".join(["word"] * 600), "Hi", max_new_tokens=3)
    chat.run()
    err = capsys.readouterr().err
    assert "dropped its" in err and "oldest turn" in err
    assert "error: this message alone takes" in err  # the 600-word message, then the session goes on
    assert chat.history[-2]["content"] == "Hi" and "[cut off at the token limit]" in err
    assert not tiny_llm.engine.has_unfinished()
