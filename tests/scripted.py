"""An LLM whose sampler answers with set replies, one after the other, whatever the logits: built by the server's
engine process (a picklable build), for the tests of the reasoning split and of the chat page."""

from pathlib import Path

import torch

import qwen3gen
from qwen3gen.engine.sampler import Sampled

IM_END = 151645


class ScriptedLLM:
    def __init__(self, checkpoint: Path, replies: list[str]) -> None:
        self.checkpoint, self.replies = checkpoint, replies

    def __call__(self) -> qwen3gen.LLM:
        llm = qwen3gen.load(self.checkpoint, device="cpu", dtype="float32", kv_memory="16MiB")
        replies = iter([llm.tokenizer.encode(reply) + [IM_END] for reply in self.replies])
        reply = iter(())

        def sample(requests: list, logits: torch.Tensor, greedy: torch.Tensor | None = None) -> Sampled:
            nonlocal reply
            tokens = []
            for _ in requests:
                token = next(reply, None)
                if token is None:
                    reply = iter(next(replies))
                    token = next(reply)
                tokens.append(token)
            return Sampled.of(torch.tensor(tokens), [], [], [])

        llm.engine.sampler.sample = sample
        return llm
