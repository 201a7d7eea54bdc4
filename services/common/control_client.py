"""The client attention and FFN processes use to talk to the controller.

Register once (it blocks until the whole cluster has); when an idle cluster gets work, the
attention instance that has it opens the next step and the other members, waiting for it,
wake (busy steps never come here: their sizes travel with the data).
Heartbeats say the member is alive and answer whether it should keep running.

Long waits are long-polls: each call asks the controller to wait server-side, and asks again
until its own timeout, so no RPC hangs. Errors come back as Python exceptions:
- `EpochChanged`: the epoch the call names is over; register again (with `last_epoch`);
- `ControlError`: the controller refused (other model, index taken...);
- `ClusterShutdown`: the cluster is stopping; the caller should stop too;
- `TimeoutError`: the wait ran out (the message says who is missing), or no answer came;
- `ConnectionError`: the controller cannot be reached.
One client is safe to share between threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from services.common.cluster import ClusterState, Member, Membership
from services.common.cluster_secret import SendSecret
from services.common.wire import control as wire

__all__ = [
    "ClusterShutdown",
    "ControlClient",
    "ControlError",
    "EpochChanged",
    "Member",
    "PlaceTaken",
    "Membership",
]

# Codes the controller uses for refusals (proto/afd/v1/control.proto).
_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
)


class ControlError(RuntimeError):
    """A refusal from the controller; the message says why and what to do."""


class PlaceTaken(ControlError):
    """Another live member holds this role and index (ALREADY_EXISTS)."""


class EpochChanged(ControlError):
    """The membership epoch a call named is over: the cluster re-formed; register again."""


class ClusterShutdown(Exception):
    """The controller is shutting the cluster down."""


class ControlClient:
    def __init__(self, address: str, timeout_s: float = 30.0, secret: str | None = None) -> None:
        """`timeout_s` bounds each call beyond the time it asks the controller to wait;
        `secret`: the cluster secret, sent with every call (cluster_secret.py)."""
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        channel = self._channel
        if secret is not None:
            channel = grpc.intercept_channel(channel, SendSecret(secret))
        self._stub = wire.controller_stub(channel)

    def register(
        self,
        role: str,
        index: int,
        address: str,
        fingerprint: str,
        timeout_s: float = 120.0,
        last_epoch: int = 0,
        incarnation: str = "",
    ) -> Membership:
        """Join as `role` instance `index`, serving at `address`; block until the epoch's
        membership forms and return it. `last_epoch`: the epoch this member last belonged
        to, when it joins again (its group broke, or the cluster moved on)."""
        deadline = time.monotonic() + timeout_s
        while True:
            wait = max(0.0, deadline - time.monotonic())
            request = wire.register_request(
                role, index, address, fingerprint, wait, last_epoch, incarnation
            )
            # wait_for_ready: a member may start before the controller does.
            response = self._call(self._stub.Register, request, wait, wait_for_ready=True)
            membership, missing = wire.register_result(response)
            if membership is not None:
                return membership
            if time.monotonic() >= deadline:
                names = ", ".join(f"{role} instance {index}" for role, index in missing)
                raise TimeoutError(
                    f"the cluster did not form within {timeout_s:g} s: still missing {names}"
                )

    def open_step(self, epoch: int, step: int, attention_index: int) -> None:
        """This attention instance starts `step` after an idle one: wake who waits for it."""
        self._call(self._stub.OpenStep, wire.open_step_request(epoch, step, attention_index))

    def await_step(self, epoch: int, step: int, timeout_s: float) -> bool:
        """Whether some attention instance opened `step`, waiting at most `timeout_s`."""
        request = wire.await_step_request(epoch, step, timeout_s)
        return self._call(self._stub.AwaitStep, request, timeout_s).open

    def heartbeat(self, role: str, index: int) -> tuple[bool, int]:
        """Say `role` instance `index` is alive. Returns whether it should keep running
        (False: the cluster is shutting down) and the epoch the cluster is at."""
        response = self._call(self._stub.Heartbeat, wire.heartbeat_request(role, index))
        return wire.heartbeat_result(response)

    def leave(self, role: str, index: int) -> None:
        """Leave the cluster for good (a drained instance); it re-forms without this one."""
        self._call(self._stub.Leave, wire.leave_request(role, index))

    def state(self) -> ClusterState:
        """The cluster's current epoch, its newest formed membership and its size."""
        request = wire.get_membership_request()
        # wait_for_ready: a member may start before the controller does.
        response = self._call(self._stub.GetMembership, request, wait_for_ready=True)
        return wire.get_membership_result(response)

    def shutdown(self) -> None:
        """Stop the whole cluster: waiters get ClusterShutdown, heartbeats return False."""
        self._call(self._stub.Shutdown, wire.shutdown_request())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        wait_s: float = 0.0,
        wait_for_ready: bool = False,
    ) -> Any:
        try:
            return method(request, timeout=wait_s + self.timeout_s, wait_for_ready=wait_for_ready)
        except grpc.RpcError as err:
            raise _translate(err, self.address) from err


def _translate(err: grpc.RpcError, address: str) -> Exception:
    code, details = err.code(), err.details()
    if code is grpc.StatusCode.ABORTED:
        return ClusterShutdown(details)
    if code is grpc.StatusCode.OUT_OF_RANGE:
        return EpochChanged(details)
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return PlaceTaken(details)
    if code in _REFUSALS:
        return ControlError(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        return ConnectionError(f"the controller at {address} is unreachable: {details}")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"the controller at {address} did not answer in time")
    return RuntimeError(f"the controller at {address} failed: {code.name}: {details}")
