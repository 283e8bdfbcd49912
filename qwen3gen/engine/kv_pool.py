"""The KV pool: every layer's keys and values in one allocation of fixed-size blocks, sized from a memory budget.

Layout per layer: [num_blocks, kv_heads, block_size, head_dim] for keys and for values (attention.py), so a block of
one head is block_size * head_dim contiguous values, which a kernel reads in one run.
"""

from __future__ import annotations

import math
import mmap
import os
import re

import torch

from ..config import Qwen3Config
from ..errors import InvalidParameterError, OutOfMemoryError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GPU_SHARE = 0.85  # of the free GPU memory after the weights, by default; the rest for activations and graphs
CPU_DEFAULT = 2 << 30
CPU_SHARE = 0.25  # of the available memory, if that is less than CPU_DEFAULT


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as "8GiB", "512MiB", "1.5GB" or "1000000"."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise InvalidParameterError(f"kv_memory must be a number of bytes or a size such as '8GiB', not {size!r}.")
    if isinstance(size, str):
        match = _SIZE.match(size)
        if not match:
            raise InvalidParameterError(f"kv_memory {size!r} is not a size such as '8GiB', '512MiB' or '1000000'.")
        size = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    if size <= 0:
        raise InvalidParameterError(f"kv_memory must be positive, not {size}.")
    return size


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(available_memory(device) * GPU_SHARE)
    return min(CPU_DEFAULT, int(available_memory(device) * CPU_SHARE))


def bytes_per_block(cfg: Qwen3Config, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * block_size * cfg.head_dim * dtype.itemsize


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros in anonymous memory, which the OS gives as zero pages on first touch: a pool of gigabytes
    is made at once (torch.zeros writes every byte, seconds), and resident memory grows only with the blocks used.
    The pool must hold finite values (the reference multiplies padding slots by zero weights), which zeros are."""
    nbytes = math.prod(shape) * dtype.itemsize
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)  # keeps the mmap alive


class KVPool:
    """Each layer's keys and values, [num_blocks, kv_heads, block_size, head_dim] each, as tensors of their own: a
    compiled step writes into them in place, where views of one shared tensor would make it copy the whole pool."""

    def __init__(self, cfg: Qwen3Config, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, cfg.num_key_value_heads, block_size, cfg.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        if device.type == "cpu":
            zeros = lambda: lazy_zeros(shape, dtype)  # noqa: E731
        else:
            zeros = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        self.caches = [(zeros(), zeros()) for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.caches)

    @classmethod
    def sized(
        cls, cfg: Qwen3Config, memory: int | str | None, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> "KVPool":
        """The largest pool within `memory` (None: default_kv_memory), refused before allocating when the device
        does not have it."""
        budget = default_kv_memory(device) if memory is None else parse_size(memory)
        per_block = bytes_per_block(cfg, block_size, dtype)
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise InvalidParameterError(
                f"kv_memory of {budget:,} bytes holds no KV block: one block of {block_size} tokens takes {per_block:,} "
                "bytes for this model."
            )
        have = available_memory(device)
        if num_blocks * per_block > have:
            raise OutOfMemoryError(
                f"the KV cache needs {num_blocks * per_block / 2**20:,.0f} MiB but the {device.type} device has "
                f"{have / 2**20:,.0f} MiB free; give a smaller kv_memory (--kv-memory)."
            )
        return cls(cfg, num_blocks, block_size, dtype, device)
