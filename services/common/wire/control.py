"""The control plane's messages (proto/afd/v1/control.proto) <-> plain Python values.

Requests built for the client, responses built for the controller's servicer and read back,
and the generated stub and servicer base they use. Knows nothing of how either side waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc

from services.common.cluster import ATTENTION, FFN, ClusterState, Member, Membership, Slot
from services.common.cluster_config import REPLICATED, SPLIT, ClusterConfig
from services.common.wire.gen.afd.v1 import control_pb2 as pb
from services.common.wire.gen.afd.v1 import control_pb2_grpc as pb_grpc

ControllerServicer = pb_grpc.ControllerServicer
add_controller_to_server = pb_grpc.add_ControllerServicer_to_server
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name

_ROLE_TO_PROTO = {ATTENTION: pb.ROLE_ATTENTION, FFN: pb.ROLE_FFN}
_ROLE_FROM_PROTO = {value: role for role, value in _ROLE_TO_PROTO.items()}
_LAYOUT_TO_PROTO = {SPLIT: pb.FFN_LAYOUT_SPLIT, REPLICATED: pb.FFN_LAYOUT_REPLICATED}
_LAYOUT_FROM_PROTO = {value: layout for layout, value in _LAYOUT_TO_PROTO.items()}


# Common never imports a service: the controller's "still waiting" answers are known here only
# by their shape.
class RegistrationPendingLike(Protocol):
    @property
    def missing(self) -> Sequence[Slot]: ...


def controller_stub(channel: grpc.Channel) -> pb_grpc.ControllerStub:
    return pb_grpc.ControllerStub(channel)


def role_to_proto(role: str) -> int:
    try:
        return _ROLE_TO_PROTO[role]
    except KeyError:
        raise ValueError(f"role must be one of {tuple(_ROLE_TO_PROTO)}, got {role!r}") from None


def role_from_proto(value: int) -> str:
    try:
        return _ROLE_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"the request names no known role (Role value {value})") from None


def _wait_ms(wait_s: float) -> int:
    return max(0, min(int(wait_s * 1000), 2**32 - 1))


# ---- membership ------------------------------------------------------------------------------


def cluster_config_to_proto(config: ClusterConfig) -> pb.ClusterConfig:
    return pb.ClusterConfig(
        num_micro_batches=config.num_micro_batches,
        max_num_batched_tokens=config.max_num_batched_tokens,
        fp8_dispatch=config.fp8_dispatch,
        ffn_layout=_LAYOUT_TO_PROTO[config.ffn_layout],
        ffn_instance_size=config.ffn_instance_size,
    )


def cluster_config_from_proto(message: pb.ClusterConfig) -> ClusterConfig:
    if message.ffn_layout not in _LAYOUT_FROM_PROTO:
        raise ValueError(
            f"the controller sent no known FFN layout (FfnLayout value {message.ffn_layout}): "
            "is it older than this instance? Run the same version everywhere"
        )
    return ClusterConfig(
        num_micro_batches=message.num_micro_batches,
        max_num_batched_tokens=message.max_num_batched_tokens,
        fp8_dispatch=message.fp8_dispatch,
        ffn_layout=_LAYOUT_FROM_PROTO[message.ffn_layout],
        ffn_instance_size=message.ffn_instance_size or 1,
    )


def membership_to_proto(membership: Membership) -> pb.Membership:
    return pb.Membership(
        epoch=membership.epoch,
        world_size=membership.world_size,
        store_host=membership.store_host,
        store_port=membership.store_port,
        config=cluster_config_to_proto(membership.config),
        members=[
            pb.Member(role=role_to_proto(m.role), index=m.index, rank=m.rank, address=m.address)
            for m in membership.members
        ],
    )


def membership_from_proto(message: pb.Membership) -> Membership:
    return Membership(
        epoch=message.epoch,
        world_size=message.world_size,
        store_host=message.store_host,
        store_port=message.store_port,
        config=cluster_config_from_proto(message.config),
        members=tuple(
            Member(role_from_proto(m.role), m.index, m.rank, m.address) for m in message.members
        ),
    )


def register_request(
    role: str,
    index: int,
    address: str,
    fingerprint: str,
    wait_s: float,
    last_epoch: int = 0,
    incarnation: str = "",
) -> pb.RegisterRequest:
    return pb.RegisterRequest(
        role=role_to_proto(role),
        index=index,
        address=address,
        fingerprint=fingerprint,
        wait_ms=_wait_ms(wait_s),
        last_epoch=last_epoch,
        incarnation=incarnation,
    )


def register_response(outcome: Membership | RegistrationPendingLike) -> pb.RegisterResponse:
    if isinstance(outcome, Membership):
        return pb.RegisterResponse(membership=membership_to_proto(outcome))
    missing = [pb.Slot(role=role_to_proto(role), index=index) for role, index in outcome.missing]
    return pb.RegisterResponse(pending=pb.RegisterResponse.Pending(missing=missing))


def register_result(response: pb.RegisterResponse) -> tuple[Membership | None, list[Slot]]:
    """(the membership, []) once formed, else (None, the places still missing)."""
    if response.HasField("membership"):
        return membership_from_proto(response.membership), []
    return None, [(role_from_proto(slot.role), slot.index) for slot in response.pending.missing]


# ---- steps (only a step after an idle one: keep these lean) ---------------------------------


def open_step_request(epoch: int, step: int, attention_index: int) -> pb.OpenStepRequest:
    return pb.OpenStepRequest(epoch=epoch, step=step, attention_index=attention_index)


def open_step_response() -> pb.OpenStepResponse:
    return pb.OpenStepResponse()


def await_step_request(epoch: int, step: int, wait_s: float) -> pb.AwaitStepRequest:
    return pb.AwaitStepRequest(epoch=epoch, step=step, wait_ms=_wait_ms(wait_s))


def await_step_response(open_: bool) -> pb.AwaitStepResponse:
    return pb.AwaitStepResponse(open=open_)


# ---- liveness and shutdown -------------------------------------------------------------------


def heartbeat_request(role: str, index: int) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(role=role_to_proto(role), index=index)


def heartbeat_response(keep_running: bool, epoch: int) -> pb.HeartbeatResponse:
    return pb.HeartbeatResponse(keep_running=keep_running, epoch=epoch)


def heartbeat_result(response: pb.HeartbeatResponse) -> tuple[bool, int]:
    """Whether the member should keep running, and the epoch the cluster is at."""
    return response.keep_running, response.epoch


def leave_request(role: str, index: int) -> pb.LeaveRequest:
    return pb.LeaveRequest(role=role_to_proto(role), index=index)


def leave_response() -> pb.LeaveResponse:
    return pb.LeaveResponse()


def shutdown_request() -> pb.ShutdownRequest:
    return pb.ShutdownRequest()


def shutdown_response() -> pb.ShutdownResponse:
    return pb.ShutdownResponse()


def get_membership_request() -> pb.GetMembershipRequest:
    return pb.GetMembershipRequest()


def get_membership_response(state: ClusterState) -> pb.GetMembershipResponse:
    response = pb.GetMembershipResponse(
        epoch=state.epoch,
        num_attention_places=state.num_attention_places,
        num_ffn_places=state.num_ffn_places,
        config=cluster_config_to_proto(state.config),
    )
    if state.membership is not None:
        response.membership.CopyFrom(membership_to_proto(state.membership))
    return response


def get_membership_result(response: pb.GetMembershipResponse) -> ClusterState:
    formed = response.HasField("membership")
    return ClusterState(
        response.epoch,
        membership_from_proto(response.membership) if formed else None,
        response.num_attention_places,
        response.num_ffn_places,
        cluster_config_from_proto(response.config),
    )
