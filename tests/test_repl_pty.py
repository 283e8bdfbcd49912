"""`qwen3gen chat` in a pseudo-terminal, as a user runs it: Ctrl-C (the terminal's own SIGINT) during a reply stops
the reply and keeps the session, colours are reset, the next turn is answered, and Ctrl-D ends it with exit code 0.
Two Ctrl-C at the prompt after a stopped reply quit with 130; a history past the context is trimmed with a notice."""

import contextlib
import os
import pty
import select
import sys
import time
from collections.abc import Iterator


def read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 60) -> bytes:
    """Read the terminal until `marker` appears after what `seen` held; returns the new output."""
    start, deadline = len(seen), time.monotonic() + timeout
    while marker not in seen[start:]:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(seen[start:])[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"the chat ended before {marker!r}: {bytes(seen[start:])[-2000:]!r}"
            seen += chunk
    return bytes(seen[start:])


@contextlib.contextmanager
def chat_in_a_terminal(checkpoint, max_new_tokens: int = 450) -> Iterator[dict]:  # noqa: ANN001
    """`qwen3gen chat` in a new pseudo-terminal, at its first prompt: yields {"pid", "fd", "seen" (what it printed)};
    killed afterwards unless exit_code saw it end."""
    command = [sys.executable, "-m", "qwen3gen.cli", "chat", "--model", str(checkpoint), "--device", "cpu",
               "--no-think", "--temperature", "0", "--max-new-tokens", str(max_new_tokens)]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its controlling terminal, so Ctrl-C there is its SIGINT
        os.execv(sys.executable, command)
    chat = {"pid": pid, "fd": fd, "seen": bytearray()}
    try:
        read_until(fd, b">>> ", chat["seen"])
        yield chat
    finally:
        if chat["pid"]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


def say(chat: dict, line: str) -> bytes:
    """Type a line and Enter; what the chat printed until its next prompt."""
    os.write(chat["fd"], line.encode() + b"\r")
    return read_until(chat["fd"], b">>> ", chat["seen"])


def stop_a_reply(chat: dict) -> None:
    """Ask for a long story and stop it with Ctrl-C while it streams (450 tokens take a few seconds here)."""
    os.write(chat["fd"], b"Tell me a long story.\r")
    read_until(chat["fd"], b"story.", chat["seen"])  # the echo of the line
    time.sleep(0.3)
    os.write(chat["fd"], b"\x03")
    stopped = read_until(chat["fd"], b">>> ", chat["seen"])
    assert b"[stopped]" in stopped and b"\x1b[0m" in stopped and b"Traceback" not in stopped


def exit_code(chat: dict) -> int:
    """Wait (30 s at most) for the chat to end, draining its terminal; its exit code."""
    deadline = time.monotonic() + 30
    while (status := os.waitpid(chat["pid"], os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "the chat did not end"
        if select.select([chat["fd"]], [], [], 0.1)[0]:
            try:
                os.read(chat["fd"], 4096)
            except OSError:  # the terminal is closed once the chat has ended
                pass
    chat["pid"] = 0
    return os.waitstatus_to_exitcode(status[1])


def test_ctrl_c_in_a_terminal_stops_the_reply_and_keeps_the_session(tiny_checkpoint):
    with chat_in_a_terminal(tiny_checkpoint) as chat:
        stop_a_reply(chat)
        answered = say(chat, "Hi")
        assert b"tok/s" in answered or b"new tokens" in answered
        os.write(chat["fd"], b"\x04")  # Ctrl-D at the prompt
        assert exit_code(chat) == 0


def test_two_ctrl_c_at_the_prompt_after_a_stopped_reply_quit(tiny_checkpoint):
    """The terminal's SIGINT reaches the prompt's thread after a reply was stopped (the compute threads, which could
    take it, block it): the first Ctrl-C says how to quit, the second quits with 130."""
    with chat_in_a_terminal(tiny_checkpoint) as chat:
        stop_a_reply(chat)
        time.sleep(0.3)
        os.write(chat["fd"], b"\x03")
        assert b"Ctrl-C again" in read_until(chat["fd"], b">>> ", chat["seen"])
        os.write(chat["fd"], b"\x03")
        assert exit_code(chat) == 130


def test_a_history_past_the_context_loses_its_oldest_turns_in_a_terminal(tiny_checkpoint):
    """Turns of 150 words each outgrow the tiny model's 512-token context by the fourth: a notice, the session goes
    on, and a reply cut at the token limit is marked."""
    long = " ".join(["word"] * 150)
    with chat_in_a_terminal(tiny_checkpoint, max_new_tokens=3) as chat:
        printed = b"".join(say(chat, long) for _ in range(4))
        assert b"dropped its" in printed and b"oldest turn" in printed and b"Traceback" not in printed
        assert b"[cut off at the token limit]" in say(chat, "Hi")
        os.write(chat["fd"], b"\x04")
        assert exit_code(chat) == 0
