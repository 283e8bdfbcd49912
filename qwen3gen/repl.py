"""`qwen3gen chat`: the interactive multi-turn chat. A session survives everything a turn can do: Ctrl-C stops the
reply and returns to the prompt (a second Ctrl-C at the prompt, or Ctrl-D, quits), an error is one line, a history
that outgrows the context loses its oldest turns (with a notice) and max_new_tokens is capped to the room left. Each
turn resends the conversation, whose earlier turns the engine finds in its prefix cache."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import Qwen3GenError

if TYPE_CHECKING:
    from .llm import LLM

DIM, RESET = "\033[2m", "\033[0m"
ANSWER_ROOM = 256  # tokens of context kept free for a reply (or max_new_tokens, if fewer) when old turns are dropped
HELP = """commands:
  /help           this list
  /reset          forget the conversation (asks first)
  /system TEXT    set the system prompt (/system alone clears it); the conversation goes on
  /think on|off   let the model think before answering, or not
  /exit           quit (so do Ctrl-D, and Ctrl-C twice at the prompt)
Ctrl-C during a reply stops it; the session goes on."""


class ChatSession:
    def __init__(self, llm: LLM, system: str | None, thinking: bool, sampling: dict,
                 read: Callable[[str], str] = input) -> None:  # fmt: skip
        self.llm, self.system, self.thinking, self.sampling, self.read = llm, system, thinking, sampling, read
        self.history: list[dict] = []
        self.dim, self.reset = (DIM, RESET) if sys.stdout.isatty() else ("", "")

    def run(self) -> None:
        """Until /exit, Ctrl-D, or two Ctrl-C in a row at the prompt (raised as KeyboardInterrupt)."""
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        note("type a message; /help lists the commands, /exit (or Ctrl-D) quits.")
        interrupted = False
        while True:
            try:
                line = self.read(">>> ").strip()
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                if interrupted:
                    raise
                print()
                note("(Ctrl-C again, or Ctrl-D, quits)")
                interrupted = True
                continue
            interrupted = False
            if line.startswith("/"):
                if not self.command(line):
                    return
            elif line:
                self.turn(line)

    def command(self, line: str) -> bool:
        """Carry out a /command; False to quit."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            answer = self.read("forget the whole conversation? [y/N] ").strip().lower()
            if answer in ("y", "yes"):
                self.history = []
                note("conversation cleared.")
        elif name == "/system":
            self.system = rest.strip() or None
            note(f"system prompt {'set' if self.system else 'cleared'}.")
        elif name == "/think" and rest.strip() in ("on", "off"):
            self.thinking = rest.strip() == "on"
            note(f"thinking {rest.strip()}.")
        else:
            note(f"unknown command {line!r}; /help lists them.")
        return True

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def fit(self) -> int | None:
        """Drop the oldest turns until the prompt leaves room to answer; returns max_new_tokens capped to that room."""
        context = self.llm.model.config.max_position_embeddings
        wanted = self.sampling.get("max_new_tokens")
        dropped = 0
        while True:
            prompt = self.llm.tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True,
                                                            enable_thinking=self.thinking)  # fmt: skip
            room = context - len(prompt)
            if room >= min(wanted or ANSWER_ROOM, ANSWER_ROOM) or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # the oldest user turn and its answer
            dropped += 1
        if dropped:
            note(f"(the conversation outgrew the context: dropped its {dropped} oldest turn{'s' * (dropped > 1)})")
        if room < 1:
            raise Qwen3GenError(f"this message alone takes {len(prompt)} tokens, more than the context of {context}.")
        return min(wanted, room) if wanted else None  # None: the engine's default, capped to the room by the engine

    def turn(self, line: str) -> None:
        """One user message and the streamed reply (thinking dimmed, apart from the answer)."""
        self.history.append({"role": "user", "content": line})
        shown, answer, stopped = None, [], False
        try:
            max_new = self.fit()
            options = {**self.sampling, "max_new_tokens": max_new}
            stream = self.llm.chat_stream(self.messages(), enable_thinking=self.thinking, **options)
            pieces = iter(stream)
            try:
                for kind, text in pieces:
                    if kind != shown:  # the thinking dimmed, then a blank line and the answer in plain colours
                        after = f"{self.reset}\n" if shown is not None else ""
                        print(f"{self.dim}[thinking]\n" if kind == "reasoning" else after, end="")
                        shown = kind
                    if kind == "answer":
                        answer.append(text)
                    print(text, end="", flush=True)
            except KeyboardInterrupt:
                stopped = True
                pieces.close()  # the reply's requests are aborted, their blocks freed
            finally:
                print(self.reset)
        except Qwen3GenError as error:
            self.history.pop()
            print(self.reset, end="")
            note(f"error: {error}")
            return
        if stopped:
            note("[stopped]")
            self.history.append({"role": "assistant", "content": "".join(answer).strip()})
            return
        result = stream.result
        self.history.append({"role": "assistant", "content": result.answer})
        if result.generation.finish_reason == "length":
            note("[cut off at the token limit]")
        if result.stats is not None:
            note(result.stats.summary())


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
