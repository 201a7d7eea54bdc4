"""The Session RPC's server side: one stream carrying many requests (proto/afd/v1/
attention.proto).

A reader thread takes the client's generate and cancel messages and hands them to the engine
driver without waiting for the engine (`submit_async`); the driver puts every output of a
session's requests into the session's `StepOutbox` and flushes it once per engine step, so
the handler's loop sends one message per step with all of them. When the session ends (the
client went away, or closed its side with nothing left running) its requests are aborted.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from services.attention.driver import DuplicateRequestError, EngineDriver, RequestStream
from services.common.engine_output import EngineOutput
from services.common.grpc_server import ErrorInterceptor
from services.common.wire import attention as wire

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often an idle session checks that its client is still there

Item = EngineOutput | BaseException


class StepOutbox:
    """A session's outputs, batched by engine step: `add` per output, `flush` per step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Item]] = []
        self._batches: queue.SimpleQueue[list[tuple[str, Item]]] = queue.SimpleQueue()

    def add(self, request_id: str, item: Item) -> None:
        with self._lock:
            self._pending.append((request_id, item))

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._batches.put(batch)

    def take(self, timeout_s: float) -> list[tuple[str, Item]] | None:
        """The next step's outputs (and any later ones already waiting), or None."""
        try:
            batch = self._batches.get(timeout=timeout_s)
        except queue.Empty:
            return None
        while True:
            try:
                batch += self._batches.get_nowait()
            except queue.Empty:
                return batch


class Session:
    def __init__(self, driver: EngineDriver, errors: ErrorInterceptor) -> None:
        self._driver = driver
        self._errors = errors
        self._outbox = StepOutbox()
        self._lock = threading.Lock()
        self._open: dict[str, RequestStream | None] = {}  # None: submitted, not yet accepted
        self._reading = threading.Event()

    def serve(self, requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        """The handler: reads `requests` on a thread, yields one response per engine step."""
        self._reading.set()
        threading.Thread(target=self._read, args=(requests,), daemon=True).start()
        try:
            while context.is_active():
                batch = self._outbox.take(POLL_S)
                if batch is not None:
                    yield wire.session_response([self._delta(rid, item) for rid, item in batch])
                elif not self._reading.is_set():
                    with self._lock:
                        if not self._open:
                            return  # the client closed its side and nothing runs
        finally:
            with self._lock:
                streams = [s for s in self._open.values() if s is not None]
            for stream in streams:
                stream.cancel()  # the session is gone: free the requests' KV blocks

    def _read(self, requests: Iterator) -> None:
        try:
            for message in requests:
                if message.WhichOneof("kind") == "cancel":
                    self._driver.cancel(message.cancel.request_id)
                else:
                    self._submit(message.generate)
        except grpc.RpcError:
            pass  # the client went away; `serve` notices and cleans up
        except Exception:  # a reader must never die silently
            log.exception("a session's reader failed")
        finally:
            self._reading.clear()

    def _submit(self, request) -> None:
        request_id = request.request_id
        with self._lock:
            if request_id in self._open:
                message = f"request id {request_id!r} is already running in this session"
                self._refuse(request_id, DuplicateRequestError(message))
                return
            self._open[request_id] = None
        try:
            params = wire.params_from_proto(request.params)
            accepted = self._driver.submit_async(
                request_id, list(request.prompt_token_ids), params, self._outbox
            )
        except (ValueError, RuntimeError) as err:
            self._refuse(request_id, err)
            return
        accepted.add_done_callback(lambda done: self._accepted(request_id, done))

    def _accepted(self, request_id: str, done) -> None:
        error = done.exception()
        if error is not None:
            self._refuse(request_id, error)
            return
        with self._lock:
            if request_id in self._open:
                self._open[request_id] = done.result()

    def _refuse(self, request_id: str, error: BaseException) -> None:
        self._outbox.add(request_id, error)
        self._outbox.flush()

    def _delta(self, request_id: str, item: Item):
        if isinstance(item, BaseException):
            self._forget(request_id)
            return wire.session_error(request_id, self._errors.code_for(item), str(item))
        if item.finished:
            self._forget(request_id)
        return wire.session_output(item)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._open.pop(request_id, None)
