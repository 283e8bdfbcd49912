"""The ranks of a tensor-parallel engine: rank 0 is the engine, every other rank a worker process that follows it.

Rank 0 runs all of the engine (scheduler, block manager, sampling, outputs) on its shard of the model and of the KV
pool (parallel.py). Each other rank is a process of its own, started by rank 0, that holds its shard and runs every
step rank 0 sends it through the same runner code, so that the ranks meet in the same collectives in the same order.
A step's message is what the runner reads of its requests: where each starts, its new tokens, its block table's
change, sent over a gloo group on the host; the tokens sampled by a step still in flight (overlap) follow on the
device, over the model's own group (NCCL on CUDA, gloo on a CPU). Blocks are the same on every rank: rank 0's block
manager hands them out, and every rank writes its own KV heads of a token to the same slot.

A worker that fails (or loses rank 0) prints one line and exits; rank 0's next collective then fails, and its step
raises an EngineError naming the rank. gloo notices a lost peer at once; NCCL only at its timeout.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..attention import choose_backend
from ..errors import EngineError
from ..loaders.checkpoint import Checkpoint, load_model
from ..parallel import Shard
from ..sampling import SamplingParams
from .kv_pool import KVPool
from .request import Request
from .runner import ModelRunner, PendingTokens, StepLogits

JOIN_TIMEOUT_S = 300  # for a worker process to start and join the group
IDLE_TIMEOUT = datetime.timedelta(days=365)  # the control group's: workers wait for the next step as long as it takes


@dataclass(eq=False)
class Mirror:
    """A worker's copy of what the runner reads of a request of rank 0."""

    params: SamplingParams
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_tokens: int = 0


@dataclass
class StepMessage:
    """One step for the workers. entries: per scheduled request (id, start, new tokens, tokens known of them,
    num_tokens, block table (True: a new table; False: entries appended to the one sent before), pending row or -1,
    prompt_len, prompt_logprobs); gone: requests that left; pending: the size of the in-flight tokens to receive."""

    entries: list[tuple]
    gone: list[str]
    pending: int


class Leader:
    """Rank 0's hold on the other ranks: their processes, the groups, and the messages it sends them."""

    def __init__(self, shard: Shard, control: dist.ProcessGroup, processes: list, store: dist.TCPStore, vocab_size: int) -> None:
        self.shard, self.control, self.processes, self.store = shard, control, processes, store
        self.vocab_size = vocab_size  # the whole vocabulary's, of which each rank holds a share
        self.failed: str | None = None
        self._finalizer = weakref.finalize(self, _shut_down, control, processes)

    @classmethod
    def launch(cls, size: int, directory: str, device: torch.device, dtype: torch.dtype, vocab_size: int) -> "Leader":
        """Start ranks 1..size-1 (each loads its own shard of the checkpoint in `directory`) and join them in a
        process group; this process is rank 0, on `device` (the others on the CUDA devices after it)."""
        if dist.is_initialized():
            raise EngineError("this process already belongs to a torch.distributed group; a tensor-parallel engine "
                              "starts its own (one per process: close() the other one first).")  # fmt: skip
        store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // size)
        dtype_name = str(dtype).removeprefix("torch.")
        processes = [  # processes of their own, not multiprocessing's: nothing of the caller's __main__ runs again
            subprocess.Popen([
                sys.executable, "-m", __name__, str(rank), str(size), str(store.port), str(directory),
                str(rank_device(device, rank)), dtype_name, str(threads),
            ])  # fmt: skip
            for rank in range(1, size)
        ]
        try:
            wait_joined(store, processes)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=store, rank=0, world_size=size)
            control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        except BaseException:
            _shut_down(None, processes)
            raise
        return cls(Shard(0, size, dist.group.WORLD), control, processes, store, vocab_size)

    def lead(self, runner: ModelRunner, **options: object) -> "LeadRunner":
        """Build every worker's pool and runner like rank 0's (the same blocks; `options`: ModelRunner's), then run
        steps on all ranks through the runner returned."""
        self.send(("start", runner.pool.num_blocks, runner.pool.block_size, options))
        return LeadRunner(runner, self)

    def send(self, message: object) -> None:
        if self.failed:
            raise EngineError(self.failed)
        try:
            dist.broadcast_object_list([message], src=0, group=self.control)
        except RuntimeError as err:  # a lost peer: gloo's error
            raise self.failure(err) from None

    def failure(self, err: BaseException) -> EngineError:
        """The error of a step that a lost rank broke; the engine cannot go on after it."""
        time.sleep(0.2)  # a rank that broke the collective is usually exiting: let it finish, so it can be named
        lost = [(rank, code) for rank, p in enumerate(self.processes, 1) if (code := p.poll()) is not None]
        said = "".join(f": {message}" for rank, _ in lost if (message := said_by(self.store, rank)))
        who = ", ".join(f"rank {r} exited (code {c})" for r, c in lost) or f"a collective failed ({str(err).splitlines()[0]})"
        self.failed = f"tensor-parallel {who}{said}; this engine cannot go on (load the model again)."
        return EngineError(self.failed)

    def close(self) -> None:
        """Stop the workers and leave the process groups."""
        self._finalizer()


def _shut_down(control: dist.ProcessGroup | None, processes: list) -> None:
    """Tell live workers to stop (when the group still works), wait a little for them, end any left, leave the groups."""
    if control is not None and all(p.poll() is None for p in processes):
        try:
            dist.broadcast_object_list([None], src=0, group=control)
        except RuntimeError:
            pass
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if dist.is_initialized():
        dist.destroy_process_group()


class LeadRunner:
    """Rank 0's runner: sends every step to the workers before running it."""

    def __init__(self, runner: ModelRunner, leader: Leader) -> None:
        self.runner, self.leader = runner, leader
        self.sent: dict[str, tuple[Request, list[int], int]] = {}  # request id -> (request, table sent, entries sent)

    def run(self, requests: list[Request], num_tokens: list[int], pending: PendingTokens | None = None) -> StepLogits:
        entries, feeding = [], False
        for request, n in zip(requests, num_tokens):
            start, table = request.num_computed, request.block_table
            known = request.token_ids[start : start + n]
            row = pending.rows[request] if len(known) < n else -1
            feeding |= row >= 0
            _, sent_table, sent = self.sent.get(request.request_id, (None, None, 0))
            change = (False, table[sent:]) if sent_table is table else (True, list(table))
            self.sent[request.request_id] = (request, table, len(table))
            entries.append((
                request.request_id, start, n, known, request.num_tokens, change, row, request.prompt_len,
                request.params.prompt_logprobs,
            ))  # fmt: skip
        gone = [i for i, (r, _, _) in self.sent.items() if r.finished]
        for request_id in gone:
            del self.sent[request_id]
        self.leader.send(("step", StepMessage(entries, gone, len(pending.tokens) if feeding else 0)))
        try:
            if feeding:
                dist.broadcast(pending.tokens, src=0, group=self.leader.shard.group)
            return self.runner.run(requests, num_tokens, pending)
        except RuntimeError as err:  # a lost rank (gloo says so at once), or an error of this rank's own
            raise self.leader.failure(err) from None

    def record_graphs(self) -> None:
        self.leader.send(("record",))
        self.runner.record_graphs()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th CUDA device after rank 0's, or the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def wait_joined(store: dist.TCPStore, processes: list) -> None:
    """Wait until every worker has said it joins (then joining the group is quick), or refuse with its message."""
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for rank, process in enumerate(processes, 1):
        while not store.check([f"joined{rank}"]):
            if (code := process.poll()) is not None:
                said = said_by(store, rank) or "no message"
                raise EngineError(f"tensor-parallel rank {rank} exited before it started (code {code}): {said}")
            if time.monotonic() > deadline:
                raise EngineError(f"tensor-parallel rank {rank} did not start within {JOIN_TIMEOUT_S} s.")
            time.sleep(0.01)


def said_by(store: dist.TCPStore, rank: int) -> str | None:
    """What a worker that failed of itself left in the store before exiting (worker_main), if anything."""
    return store.get(f"error{rank}").decode() if store.check([f"error{rank}"]) else None


def worker_main(rank: int, size: int, port: int, directory: str, device: str, dtype: torch.dtype, threads: int) -> None:
    """A worker process: join the group, load this rank's shard, then follow rank 0's steps until it says stop.
    Ctrl-C is rank 0's to handle (it stops the workers); a worker ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = None
    try:
        torch.set_num_threads(threads)
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False)
        target = torch.device(device)
        if target.type == "cuda":
            torch.cuda.set_device(target)
        store.set(f"joined{rank}", "1")
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", store=store, rank=rank, world_size=size)
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        shard = Shard(rank, size, dist.group.WORLD)
        model = load_model(Checkpoint.open(directory), target, dtype, shard=shard)
        follow(model, shard, control)
    except Exception as err:  # one line, for a failure of this rank's own or a lost peer alike
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"qwen3gen tensor-parallel rank {rank}: {message}", file=sys.stderr)
        if store is not None:
            try:
                store.set(f"error{rank}", message)
            except RuntimeError:  # rank 0 is gone, and its store with it
                pass
        sys.exit(1)
    dist.destroy_process_group()


def follow(model: torch.nn.Module, shard: Shard, control: dist.ProcessGroup) -> None:
    """Run rank 0's steps on this rank's shard until it sends None."""
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    runner, mirrors = None, {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        message = box[0]
        if message is None:
            return
        if message[0] == "start":
            _, num_blocks, block_size, options = message
            pool = KVPool(model.config, num_blocks, block_size, dtype, device)
            kernels = options.pop("kernels")
            runner = ModelRunner(model, pool, choose_backend(device, kernels), **options)
        elif message[0] == "record":
            runner.record_graphs()
        else:
            step: StepMessage = message[1]
            requests, num_tokens, rows = [], [], {}
            for request_id, start, n, known, total, (new, table), row, prompt_len, prompt_logprobs in step.entries:
                mirror = mirrors.get(request_id)
                if mirror is None:
                    mirror = mirrors[request_id] = Mirror(SamplingParams(prompt_logprobs=prompt_logprobs), prompt_len)
                tokens = mirror.token_ids
                tokens[len(tokens) :] = [0] * (start - len(tokens))  # tokens before start are in the pool already
                tokens[start:] = known
                if new:
                    mirror.block_table = table
                else:
                    mirror.block_table += table
                mirror.num_computed, mirror.num_tokens = start, total
                requests.append(mirror)
                num_tokens.append(n)
                if row >= 0:
                    rows[mirror] = row
            for request_id in step.gone:
                mirrors.pop(request_id, None)
            pending = None
            if step.pending:
                tokens = torch.empty(step.pending, dtype=torch.long, device=device)
                dist.broadcast(tokens, src=0, group=shard.group)
                pending = PendingTokens(tokens, rows)
            runner.run(requests, num_tokens, pending)


if __name__ == "__main__":
    _rank, _size, _port, _directory, _device, _dtype, _threads = sys.argv[1:]
    worker_main(int(_rank), int(_size), int(_port), _directory, _device, getattr(torch, _dtype), int(_threads))
