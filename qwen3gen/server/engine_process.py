"""The engine in a process of its own, as vLLM's engine core is: the HTTP side's event loop and the engine's steps never
wait for one interpreter lock. The child builds the LLM and loops: take every command waiting (add, abort, a call,
stop), then step while anything is unfinished, sending each step's outputs with the engine's stats. In this process a
reader thread hands each message to the event loops of the handlers concerned, one call per loop and message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import pickle
import signal
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ..engine import Engine, RequestOutput
from ..errors import EngineError, QueueFullError
from ..llm import LLM
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer

CALLS = ("stats", "reset_prefix_cache")  # engine methods a parent may call and wait for


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP side needs of the model the engine process holds."""

    tokenizer: Tokenizer
    generation_config: dict
    context: int
    vocab_size: int


class EngineFailure:
    """Put in a handler's queue instead of an output when its request cannot go on (a failed step, the engine gone)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _send(connection: Connection, message: tuple) -> None:
    """Send, with an error the parent can unpickle in place of one it could not (an exception type of a library)."""
    try:
        data = pickle.dumps(message)
    except Exception:
        message = tuple(EngineError(f"{type(m).__name__}: {m}") if isinstance(m, BaseException) else m for m in message)
        data = pickle.dumps(message)
    connection.send_bytes(data)


def _engine_main(build: Callable[[], LLM], connection: Connection) -> None:
    """The engine process: its commands come in order on `connection`, and everything it says goes back on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    try:
        llm = build()
        llm.engine.warm_up()
    except Exception as error:
        _send(connection, ("failed", error))
        return
    engine = llm.engine
    served = ServedModel(llm.tokenizer, llm.generation_config, engine.config.max_position_embeddings, engine.vocab_size)
    _send(connection, ("ready", served, engine.stats()))
    try:
        while True:
            while connection.poll() or not engine.has_unfinished():  # blocks while there is nothing to step
                command = pickle.loads(connection.recv_bytes())
                if command[0] == "stop":
                    return
                _obey(engine, connection, command)
            before = set(engine.requests)
            try:
                outputs = engine.step()
            except Exception as error:  # the engine has dropped the step's requests
                lost = sorted(before - set(engine.requests))
                _send(connection, ("lost", lost, f"the engine failed: {type(error).__name__}: {error}", engine.stats()))
                continue
            _send(connection, ("step", outputs, engine.stats()))
    except (EOFError, OSError):  # the parent has gone
        return
    finally:
        llm.close()  # the other tensor-parallel ranks, if any


def _obey(engine: Engine, connection: Connection, command: tuple) -> None:
    """One command other than stop; every one but an abort is answered, with its result or its error."""
    kind = command[0]
    if kind == "abort":
        if command[1] in engine.requests:
            engine.abort(command[1])
        return
    seq, result = command[1], None
    try:
        if kind == "add":
            _, _, request_id, prompt_ids, params, max_queue = command
            waiting = len(engine.scheduler.waiting)
            if max_queue is not None and waiting >= max_queue:
                raise QueueFullError(f"{waiting} requests are waiting already (--max-queue {max_queue}); retry later.")
            engine.add_request(prompt_ids, params, request_id=request_id)
        elif kind in CALLS:
            result = getattr(engine, kind)(*command[2:])
        else:
            raise EngineError(f"the engine process has no command {kind!r}.")
    except Exception as error:
        result = error
    _send(connection, ("reply", seq, result, engine.stats()))


class EngineProcess:
    """Starts the engine process, which builds its LLM with `build` (a picklable callable: functools.partial(load,
    ...)); ready when this returns, the build's own error raised otherwise. add, abort and stats may be called from
    any thread; outputs go to each request's asyncio queue on the loop that added it."""

    def __init__(self, build: Callable[[], LLM], max_queue: int | None = None) -> None:
        self.max_queue = max_queue
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(build, child), name="qwen3gen-engine")
        self._process.start()
        child.close()
        try:
            message = self._receive()
        except BaseException:
            self._process.kill()
            self._process.join()
            raise
        if message is None or message[0] == "failed":
            self._process.join(timeout=30)
            if message is None:
                raise EngineError(f"the engine process ended while loading (exit code {self._process.exitcode}).")
            raise message[1]
        _, self.model, self.last_stats = message
        self._send_lock, self._lock = threading.Lock(), threading.Lock()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._sequence = itertools.count()
        self._closed: str | None = None  # why no request can be added any more
        self._reader = threading.Thread(target=self._read, name="qwen3gen-engine-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        """Whether requests can be added (False once the process has stopped, or is stopping)."""
        return self._closed is None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> None:
        """Queue a request whose outputs go to `queue` (the n choices of a completion share one). Refused with the
        engine's errors, or QueueFullError past max_queue waiting requests."""
        with self._lock:
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        try:
            await asyncio.wrap_future(self._call("add", request_id, prompt_ids, params, self.max_queue))
        except BaseException:  # refused, or the handler cancelled: an abort after the add, in case it was added
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request (its client gone): the engine frees its blocks before it takes any later command."""
        with self._lock:
            known = self._queues.pop(request_id, None) is not None
        if known and self._closed is None:
            self._command(("abort", request_id))

    def stats(self, timeout_s: float = 60) -> dict:
        """The engine's stats once it has taken every command sent before this one (from a thread, not a loop)."""
        return self._call("stats").result(timeout_s)

    async def current_stats(self) -> dict:
        """stats() from an event loop."""
        return await asyncio.wrap_future(self._call("stats"))

    def reset_prefix_cache(self, timeout_s: float = 60) -> None:
        self._call("reset_prefix_cache").result(timeout_s)

    def stop(self, timeout_s: float = 30) -> None:
        """Abort what is left and end the process."""
        self._close("the server shut down before the request finished.")
        try:
            self._command(("stop",))
        except EngineError:
            pass
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join(timeout_s)  # it reads to the end of what the process said
        self._connection.close()

    def _call(self, kind: str, *args: object) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed is not None:
                raise EngineError(self._closed)
            seq = next(self._sequence)
            self._replies[seq] = future
        self._command((kind, seq, *args))
        return future

    def _command(self, command: tuple) -> None:
        try:
            with self._send_lock:
                self._connection.send_bytes(pickle.dumps(command))
        except (OSError, ValueError):
            raise EngineError("the engine process has stopped.") from None

    def _receive(self) -> tuple | None:
        try:
            return pickle.loads(self._connection.recv_bytes())
        except (EOFError, OSError):
            return None

    def _read(self) -> None:
        while (message := self._receive()) is not None:
            kind, *body, self.last_stats = message
            if kind == "reply":
                seq, result = body
                with self._lock:
                    future = self._replies.pop(seq, None)  # None: closed (stopping) while the call was answered
                if future is not None:
                    _settle(future, result)
            elif kind == "step":
                self._deliver([(output.request_id, output) for output in body[0]])
            else:  # lost
                lost, why = body
                self._deliver([(request_id, EngineFailure(why)) for request_id in lost])
        self._close("the engine process has stopped.")

    def _deliver(self, items: list[tuple[str, RequestOutput | EngineFailure]]) -> None:
        """Each item to its request's queue, one call into each event loop; a request's last item forgets it."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for request_id, item in items:
                entry = self._queues.get(request_id)
                if entry is None:
                    continue
                if isinstance(item, EngineFailure) or item.finished:
                    del self._queues[request_id]
                by_loop[entry[0]].append((entry[1], item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # its event loop has closed (the server is gone): nobody waits for these
                pass

    def _close(self, why: str) -> None:
        """No more requests: every waiting handler and caller hears `why`."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = why
            queued, replies = list(self._queues), list(self._replies.values())
            self._replies.clear()
        self._deliver([(request_id, EngineFailure(why)) for request_id in queued])
        for future in replies:
            _settle(future, EngineError(why))


def _settle(future: concurrent.futures.Future, result: object) -> None:
    """A reply to its caller, unless the caller has given up waiting (a handler cancelled with its client gone)."""
    try:
        future.set_exception(result) if isinstance(result, BaseException) else future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)
