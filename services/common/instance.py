"""What every attention and FFN process does around its real work: serve gRPC health, join
the cluster through the controller, form the torch.distributed group, send heartbeats, and
stop cleanly on SIGTERM / SIGINT or when the controller shuts the cluster down."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass

import torch

from services.common import cluster_secret
from services.common.cluster import HEARTBEAT_INTERVAL_S
from services.common.control_client import ControlClient, Membership
from services.common.dist import join_group, leave_group, peer_names, wait_for_all
from services.common.fingerprint import model_fingerprint
from services.common.grpc_server import DEFAULT_MAX_WORKERS, ErrorCodes, GrpcServer
from services.common.metrics import add_metrics_argument
from services.common.transport import Transport, channel_groups

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 3600.0  # loading a real checkpoint's share can take many minutes


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=int, required=True, help="0-based index in its role")
    parser.add_argument("--controller", metavar="HOST:PORT", help="the control plane (required)")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address of this instance's gRPC")
    parser.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, ...")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a peer may take to answer within a step before the step fails",
    )
    add_metrics_argument(parser)
    cluster_secret.add_argument(parser)


@dataclass(frozen=True)
class InstanceOptions:
    role: str
    index: int
    controller: str
    model: str
    host: str
    port: int
    device: torch.device
    step_timeout_s: float
    cluster_secret: str | None = None

    @classmethod
    def from_args(cls, role: str, args: argparse.Namespace) -> InstanceOptions:
        if not args.controller:
            raise ValueError("--controller HOST:PORT is required: the control plane to join")
        if args.step_timeout <= 0:
            raise ValueError(f"--step-timeout must be positive, got {args.step_timeout}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no usable CUDA GPU")
        return cls(
            role,
            args.index,
            args.controller,
            args.model,
            args.host,
            args.port,
            device,
            args.step_timeout,
            cluster_secret.load(args.cluster_secret_file),
        )

    @property
    def name(self) -> str:
        return f"{self.role} instance {self.index}"


class Instance:
    """One member's lifecycle. `joined` membership and `transport` are set by `join`."""

    def __init__(
        self,
        options: InstanceOptions,
        error_codes: ErrorCodes | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        self.options = options
        self.stopping = threading.Event()
        self.server = GrpcServer(error_codes, max_workers, secret=options.cluster_secret)
        self.port = self.server.bind(options.host, options.port)
        self.server.start()
        self.control = ControlClient(options.controller, secret=options.cluster_secret)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopping.set())

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    def join(self) -> tuple[Membership, Transport]:
        """Register (blocks until the cluster is complete) and join the data-plane group."""
        o = self.options
        membership = self.control.register(
            o.role, o.index, self.address, model_fingerprint(o.model)
        )
        self.rank = membership.rank_of(o.role, o.index)
        self.membership = membership
        self._store = join_group(
            membership, self.rank, o.device, o.step_timeout_s, o.cluster_secret
        )
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        groups = channel_groups() if o.device.type == "cuda" else None
        return membership, Transport(peer_names(membership), o.step_timeout_s, groups)

    def wait_for_peers(self) -> None:
        """Call once loaded: returns when every instance is, so no step starts before."""
        wait_for_all(self._store, self.membership, self.rank, READY_TIMEOUT_S)

    def _heartbeats(self) -> None:
        while not self.stopping.wait(HEARTBEAT_INTERVAL_S):
            try:
                if not self.control.heartbeat(self.options.role, self.options.index):
                    log.info("the controller is shutting the cluster down")
                    self.stopping.set()
            except (ConnectionError, TimeoutError) as err:
                log.warning("heartbeat failed: %s", err)

    def close(self) -> None:
        self.stopping.set()
        self.server.stop(grace_s=1.0)
        leave_group()
        self.control.close()
