"""What a generation returns: its text, tokens, finish reason, log-probabilities and statistics."""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .engine.request import Logprob


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float  # new tokens after the first, over the time they took
    total_s: float
    peak_memory_bytes: int  # since the last results.reset_peak_memory (the CLI's and bench's runs reset it first)
    memory_kind: str  # what peak_memory_bytes measures: "cuda", "xpu", "mps" or "cpu-rss"
    cached_prompt_tokens: int = 0  # found in the prefix cache, not computed

    def summary(self) -> str:
        cached = f" ({self.cached_prompt_tokens} cached)" if self.cached_prompt_tokens else ""
        return (
            f"{self.prompt_tokens} prompt{cached} + {self.new_tokens} new tokens | TTFT {self.time_to_first_token_s * 1e3:.1f} ms | "
            f"decode {self.decode_tokens_per_s:.1f} tok/s | total {self.total_s:.2f} s | "
            f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB ({self.memory_kind})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One request's result. token_ids are the new tokens, without a final EOS; text is their decoding, cut before a
    stop string. logprobs: one entry per token of token_ids when asked for; prompt_logprobs: one per prompt token (None
    for the first)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string), "length" or "abort"
    stats: GenerationStats | None = None
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The device's peak memory in bytes since the last reset_peak_memory, and what was measured. On a CPU, the
    process's peak resident memory: since the last reset on Linux (VmHWM), for the process's life elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    if device.type == "xpu":
        return torch.xpu.max_memory_allocated(device), "xpu"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), "mps"
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024, "cpu-rss"
    except (OSError, AttributeError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024, "cpu-rss"


def reset_peak_memory(device: torch.device) -> bool:
    """Start the device's peak memory from what it holds now; False where that cannot be done (a CPU off Linux, or
    one that refuses: the peak is then the process's so far). Process-wide: for benchmarks, which own the process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu":
        torch.xpu.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from the current
        except OSError:
            return False
    return True
