"""Runs one scheduled step through the model: the step's tokens side by side, their pool slots, the attention layout,
and the logits of the rows that are sampled (or scored, for prompt log-probabilities).

On CUDA with the kernels, a step is the replay of a CUDA graph recorded over fixed input buffers: a replay launches
every kernel of the step at once, where launching them one by one from Python takes longer than running them at
small batches (and about as long as the prefill of a short prompt). A decode-only step replays the graph of the next
padded batch size (GRAPH_SIZES), its padding rows decoding a dummy token into the scratch block 0; a step with prefill
chunks replays the graph of the next padded token count (PREFILL_SIZES), its padding tokens written to the scratch
block and attended by no one. With compile, the decode graphs record torch.compile'd steps: batch size 1 for its own
shapes, then one compilation for every larger size (torch.compile's automatic dynamic shapes), so that recording the
graph of a new size costs a replay of the compiled code, not a compilation.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import AttentionBackend, PagedBatch, to_device
from ..model import Qwen3, rotary_table
from .kv_pool import KVPool
from .request import Request

GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Token counts of the recorded steps with prefill chunks: a step pads to the next one, so the steps apart grow by half.
PREFILL_SIZES = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)


@dataclass
class StepLogits:
    logits: torch.Tensor  # [rows, vocab]
    sample_rows: dict[Request, int]  # the row of each request that samples its next token in this step
    prompt_rows: dict[Request, tuple[int, int]]  # (first row, row count) of prompt positions to score
    greedy: torch.Tensor | None = None  # each row's largest logit's token, where the step computed them [rows]

    def sampled_logits(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampling rows' logits in the order of sample_rows (a view when they are the first rows in order), and
        their greedy tokens where the step has them."""
        rows = list(self.sample_rows.values())
        if rows == list(range(len(rows))):
            return self.logits[: len(rows)], None if self.greedy is None else self.greedy[: len(rows)]
        return self.logits[to_device(rows, self.logits.device, torch.long)], None


@dataclass
class PendingTokens:
    """The tokens sampled by the step in flight, still on the device [rows], and the row of each request."""

    tokens: torch.Tensor
    rows: dict[Request, int]


class ModelRunner:
    def __init__(
        self, model: Qwen3, pool: KVPool, backend: AttentionBackend, max_rows: int, max_tokens: int,
        compile: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.pool, self.backend = model, pool, backend
        self.device, self.dtype = model.norm.weight.device, model.norm.weight.dtype
        self.max_rows = max_rows
        self.max_blocks = -(-model.config.max_position_embeddings // pool.block_size)
        self.use_graphs = self.device.type == "cuda" and backend.kernels is not None
        self.graph_sizes = [s for s in GRAPH_SIZES if s < max_rows] + [max_rows]
        self.prefill_sizes = [s for s in PREFILL_SIZES if s < max_tokens] + [max_tokens]
        self.graphs: dict[int, DecodeGraph] = {}
        self.prefill_graphs: dict[int, PrefillGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # the prefill graphs share it
        self.feed = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # pending tokens, for the graphs
        # What the decode graphs record; torch.compile compiles at the first call, and again for new shapes as needed.
        self.decode_model: Callable[..., torch.Tensor] = model
        if compile:
            self.decode_model = torch.compile(model, fullgraph=True, options=compile_options(self.device))
        cfg = model.config
        self.tile_queries = 0  # tokens per paged_attention program, where the kernels attend prefill chunks
        if backend.kernels is not None and backend.kernels.PAGED_PREFILL:
            self.tile_queries = backend.kernels.tile_queries(cfg.num_attention_heads, cfg.num_key_value_heads)

    @functools.cached_property
    def rope_table(self) -> torch.Tensor:
        """The rotary angles of every position, which the recorded steps look up rather than compute at each replay;
        made when the first is recorded."""
        cfg = self.model.config
        return rotary_table(cfg, cfg.max_position_embeddings, self.device, self.dtype)

    def batch(self, slots: torch.Tensor, query_lens: list[int], seq_lens: list[int], tables: torch.Tensor) -> PagedBatch:
        return PagedBatch.of(
            self.backend, self.pool.caches, slots, query_lens, seq_lens, tables, self.dtype, self.tile_queries
        )  # fmt: skip

    @torch.inference_mode()
    def run(self, requests: list[Request], num_tokens: list[int], pending: PendingTokens | None = None) -> StepLogits:
        """Compute the step's tokens (their keys and values go to the pool) and return the logits that are needed. A
        request's pending token (its last, sampled by the step in flight) is taken from pending.tokens on the device."""
        tokens, fed, starts, rows, prompt_rows, sample_rows = [], [], [], [], {}, {}
        feeding = False
        for request, n in zip(requests, num_tokens):
            start = request.num_computed
            known = request.token_ids[start : start + n]
            tokens += known
            fed += [-1] * len(known)
            if len(known) < n:  # only the last token can be pending
                fed.append(pending.rows[request])
                tokens.append(0)
                feeding = True
            starts.append(start)
            if request.params.prompt_logprobs is not None and start < request.prompt_len - 1:
                scored = min(start + n, request.prompt_len - 1) - start  # positions whose next token is a prompt token
                prompt_rows[request] = (len(rows), scored)
                rows += range(len(tokens) - n, len(tokens) - n + scored)
            if start + n == request.num_tokens:
                sample_rows[request] = len(rows)
                rows.append(len(tokens) - 1)
        decode = self.use_graphs and max(num_tokens) == 1  # at most max_running requests: the largest graph size
        graph = self.decode_graph(len(requests)) if decode else None  # recorded (perhaps now) before the feed is set
        # The recorded steps read the pending tokens from their fixed buffer, where a decode graph leaves its
        # greedy tokens (which are the pending ones unless the sampler changed them elsewhere).
        if self.use_graphs and feeding and pending.tokens.data_ptr() != self.feed.data_ptr():
            self.feed[: len(pending.tokens)].copy_(pending.tokens)
        if graph is not None:
            logits = graph.replay(requests, tokens, fed, starts)[: len(requests)]
            return StepLogits(logits, sample_rows, prompt_rows, self.feed[: len(requests)])
        seq_lens = [s + n for s, n in zip(starts, num_tokens)]
        which = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(num_tokens))  # each token's request
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, num_tokens)])
        if self.use_graphs and self.tile_queries and not prompt_rows:  # (prompt scoring needs logits of any count)
            size = next(s for s in self.prefill_sizes if s >= len(tokens))
            if size not in self.prefill_graphs:
                self.prefill_graphs[size] = PrefillGraph(self, size)
            graph = self.prefill_graphs[size]
            logits = graph.replay(requests, tokens, fed, which, positions, num_tokens, seq_lens, rows)
            return StepLogits(logits, sample_rows, prompt_rows)
        tables = block_tables(requests, max(-(-n // self.pool.block_size) for n in seq_lens))
        slots = token_slots(tables, which, positions, self.pool.block_size)
        batch = self.batch(to_device(slots, self.device), num_tokens, seq_lens, to_device(tables, self.device))
        ids = to_device(tokens, self.device, torch.long)
        if feeding:
            ids = feed_pending(ids, to_device(fed, self.device, torch.long), pending.tokens)
        logits = self.model(ids, to_device(positions, self.device), batch, to_device(rows, self.device, torch.long))
        return StepLogits(logits, sample_rows, prompt_rows)

    def record_graphs(self) -> None:
        """Record the graph of every decode batch size and prefill token count now (where steps are recorded), as a
        server does before it listens; otherwise the first step of each size records it (and compiles, with
        compile), and waits for it."""
        if not self.use_graphs:
            return
        for size in sorted(set(self.graph_sizes) - set(self.graphs), reverse=True):
            self.graphs[size] = DecodeGraph(self, size)
        prefill_sizes = set(self.prefill_sizes if self.tile_queries else ())
        for size in sorted(prefill_sizes - set(self.prefill_graphs), reverse=True):
            self.prefill_graphs[size] = PrefillGraph(self, size)

    def decode_graph(self, rows: int) -> DecodeGraph:
        """The decode graph of the next padded size, recorded at its first use."""
        size = next(s for s in self.graph_sizes if s >= rows)
        if size not in self.graphs:
            self.graphs[size] = DecodeGraph(self, size)
        return self.graphs[size]


def feed_pending(ids: torch.Tensor, fed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The step's token ids, each whose entry in fed is a row (not -1) taken from tokens[row]: the tokens sampled by
    the step in flight, still on the device."""
    return torch.where(fed >= 0, tokens[fed], ids)  # (-1 reads tokens' last entry, unused)


def block_tables(requests: list[Request], width: int) -> torch.Tensor:
    """The requests' block tables [requests, width] (int32, on the host), zeros past each one's end."""
    return torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in requests], dtype=torch.int32)


def token_slots(tables: torch.Tensor, which: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each token's pool slot: block tables[which, position // block_size], at offset position % block_size."""
    return tables[which, positions // block_size].long() * block_size + positions % block_size


class HostTables:
    """A recorded step's block tables on the host, kept from step to step: a row is written only where it changed (a
    new request in the row: all of its table; a table that grew: the new entries), where building every table again
    costs the host time per block at every step. A row past the step's requests has block 0 (the scratch block) first."""

    def __init__(self, tables: torch.Tensor) -> None:
        self.tables = tables  # [rows, width] int32, zeros
        self.held: list[list[int] | None] = [None] * len(tables)  # the table (the list itself) each row was written from
        self.written = [0] * len(tables)
        self.used = 0

    def update(self, requests: list[Request]) -> torch.Tensor:
        """The rows brought up to date with the requests' tables."""
        for row, request in enumerate(requests):
            table = request.block_table
            start = self.written[row] if self.held[row] is table else 0
            if start < len(table):
                self.tables[row, start : len(table)] = torch.tensor(table[start:], dtype=torch.int32)
            self.held[row], self.written[row] = table, len(table)
        for row in range(len(requests), self.used):
            self.tables[row, 0] = 0
            self.held[row], self.written[row] = None, 0
        self.used = len(requests)
        return self.tables


class StepInputs:
    """A recorded step's inputs in one device buffer, copied in one piece a step: int64 parts of the given sizes, then
    the block tables [rows, width] (int32) stored column by column, so that the columns the step's tables reach are
    one run after the int64 parts: a step copies that prefix, not every row's whole width (the width a request of the
    model's whole context would need; most of it unused, and copied at every step). Each step fills one of two host
    buffers in turn, in pinned memory (a copy from pageable memory may wait for the step in flight, and the copy from
    the one buffer may still be queued behind it when the other is filled); the tables are kept from step to step
    (HostTables). Columns past the prefix keep stale ids on the device, which no row reads: a row reads only the
    blocks of its own context."""

    def __init__(self, sizes: dict[str, int], rows: int, width: int, device: torch.device) -> None:
        self.sizes, self.rows, self.width = sizes, rows, width
        self.fields = sum(sizes.values())
        words = self.fields + -(-rows * width // 2)
        self.buffer = torch.zeros(words, dtype=torch.long, device=device)
        self.parts = self.split(self.buffer)
        self.hosts = [torch.zeros(words, dtype=torch.long, pin_memory=device.type == "cuda") for _ in range(2)]
        self.host_parts = [self.split(host) for host in self.hosts]
        self.host_tables = [HostTables(parts["tables"]) for parts in self.host_parts]
        self.turn, self.used = 0, 0

    def split(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = dict(zip(self.sizes, buffer[: self.fields].split(list(self.sizes.values()))))
        parts["fields"] = buffer[: self.fields]
        columns = buffer[self.fields :].view(torch.int32)[: self.rows * self.width].view(self.width, self.rows)
        parts["tables"] = columns.t()  # [rows, width], strides (1, rows)
        return parts

    def fill(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """The next host buffer's parts, its int64 parts zeroed and its tables those of the requests' rows; copy()
        sends it."""
        parts = self.host_parts[self.turn]
        parts["fields"].zero_()
        self.host_tables[self.turn].update(requests)
        self.used = max(1, max((len(r.block_table) for r in requests), default=1))  # the columns the step reads
        return parts

    def copy(self) -> None:
        words = self.fields + -(-self.used * self.rows // 2)
        self.buffer[:words].copy_(self.hosts[self.turn][:words], non_blocking=True)
        self.turn ^= 1


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


class RecordedStep:
    """A step over fixed input buffers, recorded once as a CUDA graph on CUDA, which each call replays; on another
    device (the tests' CPU runs of the graph paths) each call runs the step as it is."""

    def __init__(self, step: Callable[[], torch.Tensor], device: torch.device, pool: tuple | None = None) -> None:
        self.step, self.graph = step, None
        if device.type != "cuda":
            return
        stream = torch.cuda.Stream(device)  # warm-up (and compilation) outside the recording, as CUDA graphs need
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = step()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.output


class DecodeGraph:
    """One decode step of `size` rows recorded over fixed input buffers (rows past the real ones decode token 0 into
    slot 0 of the scratch block, with a context of one slot). The step ends with each row's greedy token written to
    the runner's feed buffer, where the next step reads its pending tokens: a greedy batch's next step then needs no
    copy and no kernel outside its graph (the sampler takes them as its greedy picks)."""

    def __init__(self, runner: ModelRunner, size: int) -> None:
        device, self.block_size = runner.device, runner.pool.block_size
        names = ("ids", "positions", "slots", "seq_lens", "fed")  # fed: pending rows (feed_pending)
        self.inputs = StepInputs(dict.fromkeys(names, size), size, runner.max_blocks, device)
        parts = self.inputs.parts
        starts = torch.arange(size + 1, device=device)
        self.batch = PagedBatch(
            runner.backend, runner.pool.caches, parts["slots"], parts["seq_lens"], starts, parts["tables"],
            decode=True, dtype=runner.dtype, rope_table=runner.rope_table,
        )  # fmt: skip
        self.forward, self.feed, self.size = runner.decode_model, runner.feed, size
        held = self.feed.clone()  # recording runs the step once: the pending tokens it overwrites stay
        self.recorded = RecordedStep(self.step, device)
        self.feed.copy_(held)

    def step(self) -> torch.Tensor:
        parts = self.inputs.parts
        logits = self.forward(feed_pending(parts["ids"], parts["fed"], self.feed), parts["positions"], self.batch)
        torch.argmax(logits, dim=-1, out=self.feed[: self.size])  # the first maximum, as the sampler takes
        return logits

    def replay(self, requests: list[Request], tokens: list[int], fed: list[int], starts: list[int]) -> torch.Tensor:
        """The step's logits; each request's slot is found on the host, in its block table (a list)."""
        n, size = len(requests), self.block_size
        host = self.inputs.fill(requests)
        slots = [r.block_table[p // size] * size + p % size for r, p in zip(requests, starts)]
        host["fields"].view(5, -1)[:, :n] = torch.tensor([tokens, starts, slots, [p + 1 for p in starts], fed])
        host["seq_lens"][n:], host["fed"][n:] = 1, -1
        self.inputs.copy()
        return self.recorded()


class PrefillGraph:
    """A step of up to `size` tokens (prefill chunks, and decodes beside them) over up to max_rows requests, recorded
    over fixed input buffers: tokens past the real ones are token 0 at position 0, written to slot 0 of the scratch
    block; requests past the real ones have no tokens and no context, and the work list's spare entries are -1."""

    def __init__(self, runner: ModelRunner, size: int) -> None:
        device, rows, self.block_size = runner.device, runner.max_rows, runner.pool.block_size
        self.queries, self.query_tiles = runner.tile_queries, runner.backend.kernels.query_tiles
        sizes = {
            "ids": size, "fed": size, "positions": size, "slots": size, "seq_lens": rows, "starts": rows + 1,
            "tiles": 2 * (-(-size // self.queries) + rows), "singles": rows, "rows": min(rows, size),
        }  # fmt: skip
        self.inputs = StepInputs(sizes, rows, runner.max_blocks, device)
        self.parts = parts = self.inputs.parts
        self.batch = PagedBatch(
            runner.backend, runner.pool.caches, parts["slots"], parts["seq_lens"], parts["starts"], parts["tables"],
            decode=False, dtype=runner.dtype, tiles=parts["tiles"].view(2, -1), singles=parts["singles"],
            rope_table=runner.rope_table,
        )  # fmt: skip
        self.model, self.feed = runner.model, runner.feed
        self.recorded = RecordedStep(self.step, device, runner.graph_pool)

    def step(self) -> torch.Tensor:
        ids = feed_pending(self.parts["ids"], self.parts["fed"], self.feed)
        return self.model(ids, self.parts["positions"], self.batch, self.parts["rows"])

    def replay(
        self, requests: list[Request], tokens: list[int], fed: list[int], which: torch.Tensor, positions: torch.Tensor,
        query_lens: list[int], seq_lens: list[int], rows: list[int],
    ) -> torch.Tensor:  # fmt: skip
        """The step's logits at `rows`: [len(rows), vocab]. which, positions: each token's request and position."""
        parts = self.inputs.fill(requests)
        n, r = len(tokens), len(query_lens)
        parts["ids"][:n] = torch.tensor(tokens)
        parts["fed"][:n] = torch.tensor(fed)
        parts["fed"][n:] = -1
        parts["positions"][:n] = positions
        parts["slots"][:n] = token_slots(parts["tables"], which, positions, self.block_size)
        parts["seq_lens"][:r] = torch.tensor(seq_lens)
        parts["starts"][: r + 1] = torch.tensor(list(itertools.accumulate(query_lens, initial=0)))
        parts["starts"][r + 1 :] = n
        tiles, firsts, singles = self.query_tiles(query_lens, self.queries)
        work = parts["tiles"].view(2, -1)
        work[0, : len(tiles)] = torch.tensor(tiles, dtype=torch.long)
        work[0, len(tiles) :] = -1
        work[1, : len(firsts)] = torch.tensor(firsts, dtype=torch.long)
        parts["singles"][: len(singles)] = torch.tensor(singles, dtype=torch.long)
        parts["singles"][len(singles) :] = -1
        parts["rows"][: len(rows)] = torch.tensor(rows)
        self.inputs.copy()
        return self.recorded()[: len(rows)]
