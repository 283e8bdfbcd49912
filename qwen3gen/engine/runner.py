"""Runs one scheduled step through the model: the step's tokens side by side, their pool slots, the attention layout,
and the logits of the rows that are sampled (or scored, for prompt log-probabilities).

On CUDA with the decode kernels, a decode-only step is a replay of a CUDA graph recorded for the next padded batch
size (GRAPH_SIZES): a replay launches every kernel of the step at once, where launching them one by one from Python
would take longer than running them at small batches. Padding rows decode a dummy token into the scratch block 0.
With compile, the recorded steps are torch.compile'd first (one graph per batch size, compiled for its shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import AttentionBackend, PagedBatch
from ..model import Qwen3
from .kv_pool import KVPool
from .request import Request

GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass
class StepLogits:
    logits: torch.Tensor  # [rows, vocab]
    sample_rows: dict[Request, int]  # the row of each request that samples its next token in this step
    prompt_rows: dict[Request, tuple[int, int]]  # (first row, row count) of prompt positions to score


class ModelRunner:
    def __init__(self, model: Qwen3, pool: KVPool, backend: AttentionBackend, max_rows: int, compile: bool = False) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.max_blocks = -(-model.config.max_position_embeddings // pool.block_size)
        self.use_graphs = self.device.type == "cuda" and backend.kernels is not None
        self.graph_sizes = [s for s in GRAPH_SIZES if s < max_rows] + [max_rows]
        self.graphs: dict[int, DecodeGraph] = {}
        self.compile = compile

    def batch(self, slots: torch.Tensor, query_lens: list[int], seq_lens: list[int], tables: torch.Tensor) -> PagedBatch:
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=self.device)  # noqa: E731
        return PagedBatch(
            self.backend, self.pool.caches, slots, as_tensor(query_lens), as_tensor(seq_lens), tables,
            host_lens=(query_lens, seq_lens), dtype=self.dtype,
        )  # fmt: skip

    def block_tables(self, requests: list[Request], width: int) -> torch.Tensor:
        rows = [r.block_table + [0] * (width - len(r.block_table)) for r in requests]
        return torch.tensor(rows, dtype=torch.int32)

    @torch.inference_mode()
    def run(self, requests: list[Request], num_tokens: list[int]) -> StepLogits:
        """Compute the step's tokens (their keys and values go to the pool) and return the logits that are needed."""
        tokens, starts, rows, prompt_rows, sample_rows = [], [], [], {}, {}
        for request, n in zip(requests, num_tokens):
            start = request.num_computed
            tokens += request.token_ids[start : start + n]
            starts.append(start)
            if request.params.prompt_logprobs is not None and start < request.prompt_len - 1:
                scored = min(start + n, request.prompt_len - 1) - start  # positions whose next token is a prompt token
                prompt_rows[request] = (len(rows), scored)
                rows += range(len(tokens) - n, len(tokens) - n + scored)
            if start + n == request.num_tokens:
                sample_rows[request] = len(rows)
                rows.append(len(tokens) - 1)
        seq_lens = [s + n for s, n in zip(starts, num_tokens)]
        if self.use_graphs and max(num_tokens) == 1:  # at most max_running requests: the largest graph size
            logits = self.decode_graph(requests, tokens, starts)
        else:
            width = max(-(-n // self.pool.block_size) for n in seq_lens)
            tables = self.block_tables(requests, width)
            which = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(num_tokens))
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, num_tokens)])
            slots = tables[which, positions // self.pool.block_size].long() * self.pool.block_size + positions % self.pool.block_size
            batch = self.batch(slots.to(self.device), num_tokens, seq_lens, tables.to(self.device))
            ids = torch.tensor(tokens, device=self.device)
            logits = self.model(ids, positions.to(self.device), batch, torch.tensor(rows, device=self.device))
        return StepLogits(logits, sample_rows, prompt_rows)

    def decode_graph(self, requests: list[Request], tokens: list[int], starts: list[int]) -> torch.Tensor:
        """A decode step as the replay of the graph of the next padded size."""
        size = next(s for s in self.graph_sizes if s >= len(requests))
        if size not in self.graphs:
            self.graphs[size] = DecodeGraph(self, size)
        return self.graphs[size].replay(requests, tokens, starts)[: len(requests)]


def compile_options(device: torch.device) -> dict[str, bool]:
    """Inductor settings for a compiled decode step, for that compilation only. On CUDA: tuned reductions (the
    products of small batches become reductions fused with their neighbours) and programmatic dependent launch where
    this PyTorch has it (each kernel launched while the one before it finishes; a decode step is many short kernels)."""
    if device.type != "cuda":
        return {}
    options = {"coordinate_descent_tuning": True}
    if hasattr(torch._inductor.config.triton, "enable_pdl"):  # a setting of recent PyTorch releases
        options["triton.enable_pdl"] = True
    return options


class DecodeGraph:
    """One decode step of `size` rows recorded as a CUDA graph over fixed input buffers (rows past the real ones
    decode token 0 into slot 0 of the scratch block, with a context of one slot)."""

    def __init__(self, runner: ModelRunner, size: int) -> None:
        device, self.block_size = runner.device, runner.pool.block_size
        self.inputs = torch.zeros(2, size, dtype=torch.long, device=device)  # token ids, positions: one copy a step
        self.host = torch.zeros(2, size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.ids, self.positions = self.inputs
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.tables = torch.zeros(size, runner.max_blocks, dtype=torch.int32, device=device)
        self.batch = runner.batch(self.slots, [1] * size, [1] * size, self.tables)
        self.forward: Callable[..., torch.Tensor] = runner.model
        if runner.compile:
            self.forward = torch.compile(runner.model, fullgraph=True, dynamic=False, options=compile_options(device))
        self.logits = self.record()

    def step(self) -> torch.Tensor:
        """The recorded step: each row's context length and pool slot from its position and block table, then the
        model (so the host copies only the token ids, positions and block tables)."""
        self.batch.seq_lens.copy_(self.positions + 1)
        blocks = self.tables.gather(1, (self.positions // self.block_size)[:, None])[:, 0].long()
        self.slots.copy_(blocks * self.block_size + self.positions % self.block_size)
        return self.forward(self.ids, self.positions, self.batch)

    def record(self) -> torch.Tensor:
        """Run the step once outside the recording (warm-up, compilation), then record it; returns its output buffer."""
        device = self.ids.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return self.step()

    def launch(self) -> None:
        self.graph.replay()

    def replay(self, requests: list[Request], tokens: list[int], starts: list[int]) -> torch.Tensor:
        n = len(requests)
        width = max(len(r.block_table) for r in requests)
        tables = torch.zeros(self.tables.shape[0], width, dtype=torch.int32)
        tables[:n] = torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in requests], dtype=torch.int32)
        self.host.zero_()
        self.host[:, :n] = torch.tensor([tokens, starts])  # the last copy from it is done: its tokens were read back
        self.inputs.copy_(self.host, non_blocking=True)
        self.tables[:, :width].copy_(tables, non_blocking=True)
        self.launch()
        return self.logits
