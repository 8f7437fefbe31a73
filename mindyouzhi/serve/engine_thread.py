"""The engine on a background thread, shared by every HTTP connection.

All MindSpore work happens on this one thread.  Connections hand it requests through an inbox
(``submit`` returns once the engine has accepted or refused the request) and read their tokens
from a per-request queue, so a slow client never blocks the batch and the engine never waits for
a socket.  If a step fails unexpectedly, every in-flight request receives the error and the pool
is reset; the thread keeps serving.
"""
from __future__ import annotations

import queue
import sys
import threading
import traceback
from concurrent.futures import Future
from typing import Callable, Iterator, Optional

from .engine import Engine, TokenEvent
from .sampling import SamplingParams


class EngineFailure(RuntimeError):
    """The engine could not finish a request (an internal error, or the engine stopped)."""


class RequestStream:
    """One submitted request: iterate to receive its ``TokenEvent``s until it finishes."""

    # How often a watched stream re-checks its client while no token arrives.
    WATCH_INTERVAL = 0.2

    def __init__(self, owner: "EngineThread", request_id: str, events: queue.Queue):
        self._owner = owner
        self.request_id = request_id
        self._events = events
        self.finish_reason: Optional[str] = None
        # Optional "is anyone still waiting for this?" check: when it turns False the request is
        # cancelled and the iteration ends (``abandoned`` tells why).
        self.watch: Optional[Callable[[], bool]] = None
        self.abandoned = False

    def __iter__(self) -> Iterator[TokenEvent]:
        while self.finish_reason is None:
            if self.watch is not None and not self.watch():
                self.abandoned = True
                self.cancel()
                return
            try:
                item = self._events.get(timeout=1.0 if self.watch is None else self.WATCH_INTERVAL)
            except queue.Empty:
                if not self._owner.is_alive():
                    raise EngineFailure("the engine stopped") from None
                continue
            if isinstance(item, BaseException):
                raise EngineFailure(str(item)) from item
            self.finish_reason = item.finish_reason
            yield item

    def cancel(self) -> None:
        """Free the request's blocks at the next step (client gone, or a stop string matched)."""
        if self.finish_reason is None:
            self._owner.abort(self.request_id)
            self.finish_reason = "abort"


class EngineThread:
    def __init__(self, engine: Engine, idle_wait: float = 0.5):
        self.engine = engine
        self._idle_wait = idle_wait
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._listeners: dict[str, queue.Queue] = {}
        self._thread = threading.Thread(target=self._run, name="mindyouzhi-engine", daemon=True)

    def start(self) -> "EngineThread":
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600.0) -> RequestStream:
        """Hand a request to the engine; raises ``UserError`` if the engine refuses it."""
        if self._stopping.is_set() or not self.is_alive():
            raise EngineFailure("the engine is not running")
        accepted: Future = Future()
        events: queue.Queue = queue.Queue()
        self._inbox.put(("add", (prompt_ids, params, events), accepted))
        self._wakeup.set()
        request_id = accepted.result(timeout=timeout)
        return RequestStream(self, request_id, events)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()

    # -- the engine loop (this thread only) -------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox()
            if not self.engine.has_work():
                self._wakeup.wait(self._idle_wait)
                self._wakeup.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001 - keep serving other requests after a bug
                traceback.print_exc(file=sys.stderr)
                self._fail_all(exc)
        shutdown = EngineFailure("the server is shutting down")
        self._fail_all(shutdown)
        self._refuse_pending(shutdown)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, reply = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(payload)
                continue
            prompt_ids, params, events = payload
            try:
                request_id = self.engine.add_request(prompt_ids, params, on_event=self._deliver)
            except Exception as exc:  # noqa: BLE001 - refused: the submitter re-raises it
                reply.set_exception(exc)
                continue
            self._listeners[request_id] = events
            reply.set_result(request_id)

    def _refuse_pending(self, exc: BaseException) -> None:
        while True:
            try:
                kind, _, reply = self._inbox.get_nowait()
            except queue.Empty:
                return
            if reply is not None:
                reply.set_exception(exc)

    def _deliver(self, event: TokenEvent) -> None:
        listener = self._listeners.get(event.request_id)
        if listener is not None:
            listener.put(event)
        if event.finish_reason is not None:
            self._listeners.pop(event.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        self.engine.reset()
        listeners, self._listeners = self._listeners, {}
        for listener in listeners.values():
            listener.put(exc)
