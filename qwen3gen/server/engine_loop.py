"""The engine in a thread of its own: HTTP handlers add and abort requests from the event loop, this thread steps the
engine while any request is unfinished and hands each output to the asyncio queue of the handler that added it."""

from __future__ import annotations

import asyncio
import threading

from ..engine import Engine, RequestOutput
from ..errors import EngineError, QueueFullError
from ..sampling import SamplingParams


class EngineFailure:
    """Put in a handler's queue instead of an output when the step that ran its request failed."""

    def __init__(self, message: str) -> None:
        self.message = message


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int | None = None) -> None:
        self.engine, self.max_queue = engine, max_queue
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qwen3gen-engine", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> None:
        """Queue a request whose outputs go to `queue` (several requests may share one, as the n choices of a
        completion do). Refused at once with the engine's errors, or QueueFullError past max_queue waiting requests."""
        with self._wake:
            if self._stopping:
                raise EngineError("the server is shutting down.")
            waiting = len(self.engine.scheduler.waiting)
            if self.max_queue is not None and waiting >= self.max_queue:
                message = f"{waiting} requests are waiting already (--max-queue {self.max_queue}); retry later."
                raise QueueFullError(message)
            self.queues[request_id] = (asyncio.get_running_loop(), queue)
            try:
                self.engine.add_request(prompt_ids, params, request_id=request_id)
            except BaseException:
                del self.queues[request_id]
                raise
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request (a client gone): its blocks are free when this returns. A finished one is left alone."""
        with self._wake:
            if self.queues.pop(request_id, None) is not None and request_id in self.engine.requests:
                self.engine.abort(request_id)

    def stop(self) -> None:
        """Abort what is left and end the thread."""
        with self._wake:
            self._stopping = True
            for request_id in list(self.queues):
                self._deliver(request_id, EngineFailure("the server shut down before the request finished."))
                if request_id in self.engine.requests:
                    self.engine.abort(request_id)
            self._wake.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                outputs = self.engine.step()
            except Exception as error:  # the engine has dropped the step's requests: tell their handlers
                with self._wake:
                    for request_id in [i for i in self.queues if i not in self.engine.requests]:
                        self._deliver(request_id, EngineFailure(f"the engine failed: {type(error).__name__}: {error}"))
                continue
            with self._wake:
                for out in outputs:
                    if out.request_id in self.queues:
                        self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | EngineFailure) -> None:
        loop, queue = self.queues[request_id]
        if isinstance(item, EngineFailure) or item.finished:
            del self.queues[request_id]
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # its event loop has closed (the server is gone): nobody waits for it
            pass
