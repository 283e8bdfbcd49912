"""`qwen3gen chat` in a pseudo-terminal, as a user runs it: Ctrl-C (the terminal's own SIGINT) during a reply stops
the reply and keeps the session, colours are reset, the next turn is answered, and Ctrl-D ends it with exit code 0.
(Two Ctrl-C at the prompt, which need the terminal's SIGINT to reach the main thread, are tested in test_repl.)"""

import os
import pty
import select
import sys
import time


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


def test_ctrl_c_in_a_terminal_stops_the_reply_and_keeps_the_session(tiny_checkpoint):
    command = [sys.executable, "-m", "qwen3gen.cli", "chat", "--model", str(tiny_checkpoint), "--device", "cpu",
               "--no-think", "--temperature", "0", "--max-new-tokens", "450"]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its controlling terminal, so Ctrl-C there is its SIGINT
        os.execv(sys.executable, command)
    seen = bytearray()
    try:
        read_until(fd, b">>> ", seen)
        os.write(fd, b"Tell me a long story.\r")
        read_until(fd, b"story.", seen)  # the echo of the line
        time.sleep(0.3)  # the reply streams (450 tokens take a few seconds here)
        os.write(fd, b"\x03")
        stopped = read_until(fd, b">>> ", seen)
        assert b"[stopped]" in stopped and b"\x1b[0m" in stopped and b"Traceback" not in stopped
        os.write(fd, b"Hi\r")
        answered = read_until(fd, b">>> ", seen)
        assert b"tok/s" in answered or b"new tokens" in answered
        os.write(fd, b"\x04")  # Ctrl-D at the prompt
        deadline = time.monotonic() + 30
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            assert time.monotonic() < deadline, "the chat did not end"
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    os.read(fd, 4096)
                except OSError:  # the terminal is closed once the chat has ended
                    pass
        assert os.waitstatus_to_exitcode(status[1]) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
