"""The controller's gRPC servicer: messages in, a domain call, messages out. Nothing else.

Long-polls wait on the server, but never longer than the request asks, MAX_WAIT_S, or the
caller's deadline allows: no RPC hangs, and a caller that wants to wait longer asks again.
"""

from __future__ import annotations

import grpc

from services.common.wire import control as wire
from services.common.wire.gen.afd.v1 import control_pb2 as pb
from services.controller.errors import Conflict, Refused, ShuttingDown, StaleEpoch
from services.controller.membership import Registry
from services.controller.steps import StepDesk

# The interceptor's table (services/common/grpc_server.py); the client maps them back.
ERROR_CODES = {
    Conflict: grpc.StatusCode.ALREADY_EXISTS,
    StaleEpoch: grpc.StatusCode.OUT_OF_RANGE,
    Refused: grpc.StatusCode.FAILED_PRECONDITION,
    ShuttingDown: grpc.StatusCode.ABORTED,
}

MAX_WAIT_S = 60.0
# Answer this much before the caller's deadline, so it gets "pending" rather than an error.
DEADLINE_MARGIN_S = 0.05


def long_poll_s(wait_ms: int, context: grpc.ServicerContext) -> float:
    """How long a long-poll may wait: what the request asks, within the limits above."""
    bound = min(wait_ms / 1000, MAX_WAIT_S)
    remaining = context.time_remaining()
    if remaining is not None:
        bound = min(bound, max(0.0, remaining - DEADLINE_MARGIN_S))
    return bound


class ControllerServicer(wire.ControllerServicer):
    """Method names are the proto's; each converts, calls the domain and converts back."""

    def __init__(self, registry: Registry, steps: StepDesk) -> None:
        self._registry = registry
        self._steps = steps

    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        role, index, address = wire.role_from_proto(request.role), request.index, request.address
        self._registry.register(
            role, index, address, request.fingerprint, request.last_epoch, request.incarnation
        )
        wait_s = long_poll_s(request.wait_ms, context)
        return wire.register_response(self._registry.wait(role, index, address, wait_s))

    def OpenStep(
        self, request: pb.OpenStepRequest, context: grpc.ServicerContext
    ) -> pb.OpenStepResponse:
        self._steps.open(request.epoch, request.step, request.attention_index)
        return wire.open_step_response()

    def AwaitStep(
        self, request: pb.AwaitStepRequest, context: grpc.ServicerContext
    ) -> pb.AwaitStepResponse:
        book = self._steps.book(request.epoch)
        wait_s = long_poll_s(request.wait_ms, context)
        return wire.await_step_response(book.wait(request.epoch, request.step, wait_s))

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        role = wire.role_from_proto(request.role)
        return wire.heartbeat_response(*self._registry.heartbeat(role, request.index))

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveResponse:
        self._registry.leave(wire.role_from_proto(request.role), request.index)
        return wire.leave_response()

    def Shutdown(
        self, request: pb.ShutdownRequest, context: grpc.ServicerContext
    ) -> pb.ShutdownResponse:
        self.shut_down()
        return wire.shutdown_response()

    def GetMembership(
        self, request: pb.GetMembershipRequest, context: grpc.ServicerContext
    ) -> pb.GetMembershipResponse:
        return wire.get_membership_response(self._registry.state())

    def shut_down(self) -> None:
        """Wake every waiter with ShuttingDown; heartbeats answer keep_running=false from now."""
        self._registry.shut_down()
        self._steps.shut_down()
