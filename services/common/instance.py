"""What every attention and FFN process does around its real work: serve gRPC health, join
the cluster through the controller, form the torch.distributed group, send heartbeats, join
the next epoch when the cluster re-forms, and stop cleanly on SIGTERM / SIGINT or when the
controller shuts the cluster down."""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.common import cluster_secret
from services.common.cluster import (
    HEARTBEAT_INTERVAL_S,
    SILENT_AFTER_S,
    ClusterState,
    place_name,
    reachable_host,
)
from services.common.cluster_config import ClusterConfig
from services.common.control_client import ControlClient, ControlError, Membership, PlaceTaken
from services.common.dist import join_group, leave_group, peer_names, wait_for_all
from services.common.ffn_instances import InstanceGroups, form_instance_groups
from services.common.fingerprint import model_fingerprint
from services.common.grpc_server import DEFAULT_MAX_WORKERS, ErrorCodes, GrpcServer
from services.common.metrics import add_metrics_argument
from services.common.transport import Traffic, Transport, channel_groups, steps_group

log = logging.getLogger(__name__)

# Members load their weights before they register, so the first epoch forms only once the
# slowest has read its share of a real checkpoint: many minutes.
READY_TIMEOUT_S = 3600.0
# A replacement may start before the controller has noticed that the process it replaces
# died: it waits this long for the place to be freed before it gives up.
PLACE_TAKEN_WAIT_S = 3 * SILENT_AFTER_S
POLL_S = 1.0  # registration waits in rounds this long, so SIGTERM is noticed


def add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=int, required=True, help="0-based index in its role")
    parser.add_argument("--controller", metavar="HOST:PORT", help="the control plane (required)")
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1", help="address this instance's gRPC binds")
    parser.add_argument(
        "--advertise-host",
        help="address peers and the gateway reach this instance at (default: --host; a pod's "
        "IP in a cluster, where --host is 0.0.0.0)",
    )
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
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for the cluster to re-form after a member failed (a replacement "
        "starting included); requests in flight end with an error after that",
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
    recovery_timeout_s: float = 60.0
    cluster_secret: str | None = None
    advertise_host: str | None = None

    @classmethod
    def from_args(cls, role: str, args: argparse.Namespace) -> InstanceOptions:
        if not args.controller:
            raise ValueError("--controller HOST:PORT is required: the control plane to join")
        if args.step_timeout <= 0:
            raise ValueError(f"--step-timeout must be positive, got {args.step_timeout}")
        if args.recovery_timeout <= 0:
            raise ValueError(f"--recovery-timeout must be positive, got {args.recovery_timeout}")
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
            args.recovery_timeout,
            cluster_secret.load(args.cluster_secret_file),
            args.advertise_host or reachable_host(args.host),
        )

    @property
    def name(self) -> str:
        return f"{self.role} instance {self.index}"


class Instance:
    """One member's lifecycle. `membership` and `rank` are set by `join`; `needs_rejoin()`
    says when the heartbeat learnt that the cluster moved on without it (call `rejoin`).
    `config`: the cluster's facts, from the first `cluster_state()` or `join()`; the
    instance is built for them, so a later answer with others raises ClusterConfigChanged.
    `ffn_groups`: set by `join` for a process of an FFN instance of several, its instance's
    own groups (ffn_instances.py); None otherwise."""

    def __init__(
        self,
        options: InstanceOptions,
        error_codes: ErrorCodes | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        self.options = options
        self.stopping = threading.Event()
        self.incarnation = secrets.token_hex(8)  # this process, as the controller tells them apart
        self._closed = threading.Event()  # heartbeats go on while a stopping member drains
        self._cluster_epoch = 0  # the newest epoch a heartbeat reported
        self._unknown = False  # the controller did not know this member (it restarted)
        self.membership: Membership | None = None
        self.ffn_groups: InstanceGroups | None = None
        self.traffic = Traffic()  # data-plane bytes over every epoch (metrics)
        self.config: ClusterConfig | None = None
        self.server = GrpcServer(error_codes, max_workers, secret=options.cluster_secret)
        self.port = self.server.bind(options.host, options.port)
        self.server.start()
        self.control = ControlClient(options.controller, secret=options.cluster_secret)
        # From the start: a member waiting to register again, or in a slow rendezvous, must
        # not look dead to the controller.
        self._heartbeat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._heartbeat.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stopping.set())

    @property
    def name(self) -> str:
        """ "ffn instance 1", or "ffn instance 1 process 0" once the cluster's facts say its
        FFN instances are of several processes."""
        size = 1 if self.config is None else self.config.ffn_instance_size
        return place_name(self.options.role, self.options.index, size)

    @property
    def address(self) -> str:
        """Where peers and the gateway reach this instance: registered with the controller."""
        host = self.options.advertise_host or self.options.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address (a pod's IP on an IPv6 cluster)
        return f"{host}:{self.port}"

    def cluster_state(self) -> ClusterState:
        """The controller's view of the cluster, its facts included, once it answers (pods
        start in any order): what a member reads before it loads its weights."""
        while True:
            try:
                state = self.control.state()
            except (TimeoutError, ConnectionError) as err:
                if self.stopping.is_set():
                    raise InterruptedError(f"{self.name} is stopping") from err
                log.info("waiting for the controller: %s", err)
                continue
            self._adopt(state.config)
            return state

    def _adopt(self, config: ClusterConfig) -> None:
        if self.config is None:
            self.config = config
        else:
            self.config.check_unchanged(config)

    def join(
        self, timeout_s: float = READY_TIMEOUT_S, interruptible: bool = True
    ) -> tuple[Membership, Transport]:
        """Register (blocks until the epoch's membership forms) and join its data-plane
        group. Called again after a failure, it joins the next epoch. `interruptible`: a
        SIGTERM meanwhile ends the wait (InterruptedError); an instance that drains its
        requests after SIGTERM still needs the cluster, and waits on."""
        o = self.options
        last_epoch = 0 if self.membership is None else self.membership.epoch
        membership = self._register(timeout_s, last_epoch, interruptible)
        self._adopt(membership.config)
        self.rank = membership.rank_of(o.role, o.index)
        self.membership = membership
        self._cluster_epoch, self._unknown = membership.epoch, False
        # Every member registered once loaded, so the rendezvous itself is quick.
        self._store = join_group(
            membership, self.rank, o.device, o.step_timeout_s, o.cluster_secret,
            min(timeout_s, o.recovery_timeout_s),
        )  # fmt: skip
        groups, headers = (
            (channel_groups(), steps_group()) if o.device.type == "cuda" else (None, None)
        )
        self.ffn_groups = form_instance_groups(membership, self.rank, o.device)
        names = peer_names(membership)
        return membership, Transport(names, o.step_timeout_s, groups, headers, self.traffic)

    def _register(self, timeout_s: float, last_epoch: int, interruptible: bool) -> Membership:
        """Register and wait for the membership, in short polls so that SIGTERM interrupts
        the wait (InterruptedError). A place still held by a process the controller has not
        yet seen die is waited for, up to PLACE_TAKEN_WAIT_S."""
        o = self.options
        fingerprint = model_fingerprint(o.model)
        start = time.monotonic()
        while True:
            if interruptible and self.stopping.is_set():
                raise InterruptedError(f"{self.name} is stopping")
            left = timeout_s - (time.monotonic() - start)
            try:
                return self.control.register(
                    o.role, o.index, self.address, fingerprint, min(POLL_S, left), last_epoch,
                    self.incarnation,
                )  # fmt: skip
            except TimeoutError as err:
                if left <= POLL_S:
                    raise TimeoutError(f"{err} (waited {timeout_s:g} s in all)") from err
            except PlaceTaken as err:
                if time.monotonic() - start > PLACE_TAKEN_WAIT_S:
                    raise
                log.info("%s; waiting for the controller to notice that it is gone", err)
                time.sleep(HEARTBEAT_INTERVAL_S)

    def rejoin(
        self,
        why: str,
        interruptible: bool = True,
        prepare: Callable[[Membership], None] | None = None,
    ) -> tuple[Membership, Transport]:
        """Leave the broken epoch's group and join the next epoch (within the recovery
        timeout): a new membership and group. `prepare(membership)` runs before this member
        says it is ready (an FFN instance re-shards there when the FFN count changed)."""
        old = self.membership.epoch if self.membership else 0
        log.warning("%s leaves epoch %d: %s", self.name, old, why)
        try:
            leave_group()
        except RuntimeError as err:  # a broken group may fail to close; it is dropped anyway
            log.warning("closing epoch %d's group: %s", old, err)
        membership, transport = self.join(self.options.recovery_timeout_s, interruptible)
        if prepare is not None:
            prepare(membership)
        self.wait_for_peers(self.options.recovery_timeout_s)
        log.info("%s joined epoch %d as rank %d", self.name, membership.epoch, self.rank)
        return membership, transport

    def needs_rejoin(self) -> bool:
        """Whether the cluster moved on to a newer epoch than this member's (or forgot it)."""
        m = self.membership
        return m is not None and (self._cluster_epoch > m.epoch or self._unknown)

    def wait_for_peers(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Call once loaded: returns when every member is, so no step starts before."""
        wait_for_all(self._store, self.membership, self.rank, timeout_s)

    def leave(self) -> None:
        """Leave the cluster for good (after a drain): the others re-form without this one."""
        try:
            self.control.leave(self.options.role, self.options.index)
        except (ConnectionError, TimeoutError, ControlError) as err:
            log.warning("could not say goodbye to the controller: %s", err)

    def _heartbeats(self) -> None:
        o = self.options
        while not self._closed.wait(HEARTBEAT_INTERVAL_S):
            try:
                keep_running, epoch = self.control.heartbeat(o.role, o.index)
            except ControlError as err:
                if self.membership is not None:  # the controller restarted: it forgot us
                    log.warning("heartbeat refused: %s", err)
                    self._unknown = True
                continue
            except (ConnectionError, TimeoutError) as err:
                log.warning("heartbeat failed: %s", err)
                continue
            if not keep_running:
                log.info("the controller is shutting the cluster down")
                self.stopping.set()
            self._cluster_epoch = max(self._cluster_epoch, epoch)

    def close(self) -> None:
        self.stopping.set()
        self._closed.set()
        self.server.stop(grace_s=1.0)
        leave_group()
        self.control.close()
