"""Runs an `Engine` on its own thread and hands its outputs to the threads that want them.

The engine is not thread-safe, so exactly one thread (the driver's) ever touches it. Other
threads talk to that thread through a queue of commands (submit, cancel) and read back a
`RequestStream` per request and a `Load` snapshot. Each loop applies the pending commands,
steps the engine, delivers the step's outputs, then sleeps on an event until new work
arrives.

A disaggregated engine's step fails when a peer dies or the cluster re-forms; with a
`Recovery` the driver then waits on the engine thread while the instance joins the next
epoch, refusing new requests meanwhile, and steps on: the requests in flight lose nothing,
since a failed step changed no request's state and the KV cache lives here (recomputing
the step writes the same slots). If the cluster cannot re-form in time, they end with
`ClusterUnavailable`.

Knows nothing of gRPC: the servicer in `api.py` turns these calls into RPCs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from services.attention.engine import Engine, RequestError
from services.common.cluster_config import ClusterConfigChanged
from services.common.engine_output import EngineOutput
from services.common.sampling_params import SamplingParams


class DuplicateRequestError(RequestError):
    """A request with this id is still running on this instance."""


class DriverStopped(RuntimeError):
    """The driver is shutting down (or has stopped) and takes no more work."""


class EngineFailed(RuntimeError):
    """`engine.step()` raised; the instance serves nothing more. The cause is chained."""


class ClusterUnavailable(DriverStopped):
    """The cluster is re-forming after a failure, or could not re-form in time."""


class Recovery(Protocol):
    """How a disaggregated instance gets back into a working cluster (recovery.py)."""

    def needed(self) -> bool:
        """Whether the cluster moved on without this instance (checked before each step)."""
        ...

    def recoverable(self, error: BaseException) -> bool:
        """Whether a step's error is a broken epoch, which rejoining mends."""
        ...

    def recover(self, why: str) -> None:
        """Join the next epoch; raises if that does not happen in time, `DriverStopped` if
        the cluster is shutting down."""
        ...


@dataclass(frozen=True)
class Load:
    """What the router needs to pick an instance; a snapshot, possibly one loop old."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    admitting: bool = True  # False while draining or re-joining the cluster


class Outbox(Protocol):
    """Where a session's requests' outputs go instead of their own streams (session.py)."""

    def add(self, request_id: str, item: EngineOutput | BaseException) -> None: ...
    def flush(self) -> None: ...


class RequestStream:
    """One request's outputs, in order; iteration blocks and ends after the finished output.

    Raises `DriverStopped` or `EngineFailed` if the instance ends before the request does.
    A request submitted with an `Outbox` sends its outputs there instead, and is not iterated.
    """

    def __init__(self, request_id: str, driver: EngineDriver, outbox: Outbox | None = None):
        self.request_id = request_id
        self.outbox = outbox
        self._driver = driver
        self._items: queue.SimpleQueue[EngineOutput | BaseException] = queue.SimpleQueue()
        self._done = False  # set by the consumer once the last item was taken

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> EngineOutput:
        if self._done:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def cancel(self) -> None:
        """Abort the request if it still runs; the stream then ends with an "abort" output."""
        if not self._done:
            self._driver.cancel(self.request_id)

    def _put(self, item: EngineOutput | BaseException) -> None:
        if self.outbox is not None:
            self.outbox.add(self.request_id, item)
        else:
            self._items.put(item)


@dataclass
class _Open:
    """The engine thread's record of a running request."""

    stream: RequestStream
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # known from its first output on


@dataclass(frozen=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    accepted: Future[RequestStream]
    outbox: Outbox | None = None


@dataclass(frozen=True)
class _Cancel:
    request_id: str


class EngineDriver:
    def __init__(
        self,
        engine: Engine,
        *,
        must_step: Callable[[], bool] | None = None,
        idle_wait_s: float = 0.005,
        on_step: Callable[[], None] | None = None,
        recovery: Recovery | None = None,
    ) -> None:
        """`must_step`: whether the engine takes a step even with nothing of its own to
        compute (a disaggregated instance whose peers are busy, remote_ffn.py); `on_step`:
        called on the engine thread after every step (metrics); `recovery`: how to rejoin
        the cluster when a step fails on a broken epoch (None: fail)."""
        self._engine = engine
        self._on_step = on_step
        self._recovery = recovery
        self._recovering: str | None = None  # why, while the engine thread rejoins
        # While its peers are busy a disaggregated engine joins every step, even idle; the
        # step's transfers then pace the loop and it never sleeps.
        self._must_step = must_step or (lambda: False)
        self._idle_wait_s = idle_wait_s
        self._lock = threading.Lock()  # guards the command queue and the lifecycle flags
        self._commands: deque[_Submit | _Cancel] = deque()
        self._closed_error: BaseException | None = None  # set once the loop has ended
        self._started = False
        self._stopping = False
        self._draining = False
        self._wake = threading.Event()
        self._open: dict[str, _Open] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="engine-driver", daemon=True)
        self._load = self._snapshot()

    def start(self) -> None:
        with self._lock:
            self._started = True
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the loop; open streams end with `DriverStopped`. Raises TimeoutError if the
        engine thread is still inside a step after `timeout_s`."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the engine thread did not stop within {timeout_s} s")

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait until those in flight finish (at most `timeout_s`).
        Returns whether every one finished; `stop` then ends the rest."""
        with self._lock:
            self._draining = True
        self._load = self._snapshot()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            load = self._load
            if self._closed_error is not None or load.num_running + load.num_waiting == 0:
                with self._lock:
                    if not self._commands:
                        return True
            time.sleep(0.05)
        return False

    @property
    def open_requests(self) -> int:
        """Requests in flight (running or waiting), as of the last loop."""
        load = self._load
        return load.num_running + load.num_waiting

    def submit(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        """Add the request on the engine thread and wait until it is queued there.

        Raises `RequestError` (`DuplicateRequestError` for an id still running) with the
        engine's message if the engine refuses it, and `RuntimeError` if the driver has
        stopped or failed; in both cases nothing was queued.
        """
        return self.submit_async(request_id, prompt_token_ids, params).result()

    def submit_async(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        outbox: Outbox | None = None,
    ) -> Future[RequestStream]:
        """`submit` without waiting: the future holds the stream, or what `submit` raises.
        With an `outbox`, the request's outputs go there (a session's requests)."""
        accepted: Future[RequestStream] = Future()
        with self._lock:
            if self._closed_error is not None:
                raise self._refusal()
            if self._stopping:
                raise DriverStopped("the attention instance is shutting down")
            if self._draining:
                raise DriverStopped(
                    "the attention instance is draining before it stops: send the request "
                    "to another instance"
                )
            if self._recovering is not None:
                raise ClusterUnavailable(
                    f"the cluster is re-forming after a failure ({self._recovering}): "
                    "retry in a few seconds"
                )
            if not self._started:
                raise RuntimeError("the engine driver has not been started: call start()")
            prompt = list(prompt_token_ids)
            self._commands.append(_Submit(request_id, prompt, params, accepted, outbox))
        self._wake.set()
        return accepted

    def wake(self) -> None:
        """Look again now (a peer opened a step this idle instance must take part in)."""
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Abort the request on the engine thread before its next step, freeing its KV
        blocks. Returns at once; unknown or finished ids are ignored."""
        with self._lock:
            if self._closed_error is not None:
                return
            self._commands.append(_Cancel(request_id))
        self._wake.set()

    def load(self) -> Load:
        return self._load  # replaced whole by the engine thread, so always consistent

    @property
    def failure(self) -> BaseException | None:
        """What `engine.step()` raised, if it did."""
        error = self._closed_error
        return error.__cause__ if isinstance(error, EngineFailed) else None

    def _run(self) -> None:
        error: BaseException
        try:
            while self._loop_once():
                pass
            error = DriverStopped("the attention instance is shutting down")
        except BaseException as exc:  # every waiter must hear of it
            error = EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        self._close(error)

    def _loop_once(self) -> bool:
        self._wake.clear()  # before draining, so a command added after it wakes the wait
        while True:
            # One at a time: whatever is still queued if this thread dies is refused by _close.
            with self._lock:
                if self._stopping:
                    return False
                if not self._commands:
                    break
                command = self._commands.popleft()
            if isinstance(command, _Submit):
                self._apply_submit(command)
            else:
                self._apply_cancel(command.request_id)
        recovery = self._recovery
        if recovery is not None and recovery.needed():
            self._recover("the cluster re-formed without this instance")
        busy = self._engine.has_unfinished_requests()
        stepping = busy or self._must_step()
        if stepping:
            try:
                outputs = self._engine.step()
            except Exception as exc:
                if recovery is None or not recovery.recoverable(exc):
                    raise
                self._recover(str(exc))
                return True
            self._deliver(outputs)
            if self._on_step is not None:
                self._on_step()
        self._load = self._snapshot()
        if not stepping:
            self._wake.wait(self._idle_wait_s)  # idle: until work comes or a peer wakes us
        return True

    def _recover(self, why: str) -> None:
        """Rejoin the cluster on this thread (it owns the engine, which waits meanwhile).
        If that fails, every request in flight ends with a clear error; the next loop tries
        again."""
        with self._lock:
            self._recovering = why
        self._load = self._snapshot()
        try:
            self._recovery.recover(why)
        except DriverStopped:  # the cluster is shutting down: so does this loop
            with self._lock:
                self._stopping = True
        except ClusterConfigChanged:
            raise  # built for the old facts: the engine fails, the instance exits to restart
        except Exception as err:
            error = ClusterUnavailable(f"the cluster could not re-form ({why}): {err}")
            for request_id, record in list(self._open.items()):
                self._engine.abort_request(request_id)
                record.stream._put(error)
            _flush({record.stream.outbox for record in self._open.values()})
            self._open.clear()
        finally:
            with self._lock:
                self._recovering = None
            self._load = self._snapshot()

    def _apply_submit(self, command: _Submit) -> None:
        try:
            if command.request_id in self._open:
                raise DuplicateRequestError(f"request id {command.request_id!r} is already running")
            self._engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except Exception as exc:  # raised again in the caller
            command.accepted.set_exception(exc)
            return
        stream = RequestStream(command.request_id, self, command.outbox)
        self._open[command.request_id] = _Open(stream, len(command.prompt_token_ids))
        command.accepted.set_result(stream)

    def _apply_cancel(self, request_id: str) -> None:
        record = self._open.pop(request_id, None)
        if record is None:
            return
        self._engine.abort_request(request_id)
        record.stream._put(_aborted(request_id, record))
        _flush({record.stream.outbox})

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        outboxes = set()
        for output in outputs:
            record = self._open.get(output.request_id)
            if record is None:
                continue
            record.num_cached_tokens = output.num_cached_tokens
            record.stream._put(output)
            outboxes.add(record.stream.outbox)
            if output.finished:
                del self._open[output.request_id]
        _flush(outboxes)  # a session gets the whole step in one message

    def _close(self, error: BaseException) -> None:
        with self._lock:
            self._closed_error = error
            commands = list(self._commands)
            self._commands.clear()
        for command in commands:
            if isinstance(command, _Submit):
                command.accepted.set_exception(self._refusal())
        for request_id, record in self._open.items():
            if not isinstance(error, EngineFailed):
                self._engine.abort_request(request_id)  # leave the engine clean
            record.stream._put(error)
        _flush({record.stream.outbox for record in self._open.values()})
        self._open.clear()
        self._load = self._snapshot()

    def _refusal(self) -> RuntimeError:
        error = self._closed_error
        if isinstance(error, EngineFailed):
            return EngineFailed(f"{error}; this instance takes no more requests")
        return DriverStopped("the attention instance is shutting down")

    def _snapshot(self) -> Load:
        engine = self._engine
        return Load(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            num_free_blocks=engine.num_free_blocks,
            num_total_blocks=engine.block_manager.num_blocks,
            admitting=not (self._draining or self._recovering or self._stopping),
        )


def _flush(outboxes: set[Outbox | None]) -> None:
    for outbox in outboxes:
        if outbox is not None:
            outbox.flush()


def _aborted(request_id: str, record: _Open) -> EngineOutput:
    """The final output of a cancelled request: nothing new, finish_reason "abort"."""
    return EngineOutput(
        request_id=request_id,
        new_token_ids=(),
        new_logprobs=(),
        finished=True,
        finish_reason="abort",
        stop_reason=None,
        num_prompt_tokens=record.num_prompt_tokens,
        num_cached_tokens=record.num_cached_tokens,
    )
