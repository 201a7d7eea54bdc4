"""`python -m services.controller`: run the controller until SIGTERM or SIGINT.

Prints `controller listening on HOST:PORT` on stdout once it serves, so a parent that passed
`--port 0` can read the port. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from torch.distributed import TCPStore

from services.common import cluster_config, cluster_secret
from services.common.cluster import MEMBER_STATES, ROLES, SILENT_AFTER_S, reachable_host
from services.common.cluster_config import ClusterConfig
from services.common.fingerprint import model_fingerprint
from services.common.grpc_server import DEFAULT_MAX_WORKERS, GrpcServer
from services.common.metrics import (
    ControllerMetrics,
    add_metrics_argument,
    serve_metrics,
    service_registry,
)
from services.common.wire import control as wire
from services.controller.discovery import (
    KubernetesDiscovery,
    Target,
    default_namespace,
    kubernetes_apis,
)
from services.controller.membership import ClusterSpec, Registry
from services.controller.server import ERROR_CODES, ControllerServicer
from services.controller.steps import StepDesk

log = logging.getLogger("services.controller")

STATIC, KUBERNETES = "static", "kubernetes"
DISCOVERIES = (STATIC, KUBERNETES)
DISCOVERY_TIMEOUT_S = 60.0  # for the release's StatefulSets to exist at start
STOP_GRACE_S = 5.0
TICK_S = 0.25  # how often silent members are looked for


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.controller",
        description="Forms the AFD cluster's membership and wakes it when idle steps end.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--discovery",
        choices=DISCOVERIES,
        default=STATIC,
        help="static: the cluster's size is --attention-instances and --ffn-instances; "
        "kubernetes: the replicas of the release's attention and FFN StatefulSets, followed "
        "as they are scaled",
    )
    parser.add_argument("--attention-instances", type=int, metavar="M", help="with static")
    parser.add_argument("--ffn-instances", type=int, metavar="N", help="with static")
    parser.add_argument(
        "--kube-namespace", help="with kubernetes: where the release runs (default: this pod's)"
    )
    parser.add_argument(
        "--kube-selector",
        metavar="LABELS",
        help="with kubernetes: the release's label selector, e.g. "
        "app.kubernetes.io/instance=afd,app.kubernetes.io/name=afd",
    )
    # The cluster's facts: declared here only; every member takes them from its membership.
    cluster_config.add_arguments(parser)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--fingerprint", help="the model fingerprint every member must serve")
    model.add_argument("--model", metavar="DIR", help="a checkpoint to compute it from")
    parser.add_argument("--store-port", type=int, default=0, help="TCPStore port; 0: free one")
    parser.add_argument(
        "--advertise-host",
        help="host members use to reach the TCPStore (default: --host, or this machine's "
        "hostname when --host is a wildcard)",
    )
    parser.add_argument(
        "--member-timeout",
        type=float,
        default=SILENT_AFTER_S,
        metavar="S",
        help="a member not heard from for this long is presumed dead and the cluster re-forms "
        "without it (members send a heartbeat every second)",
    )
    add_metrics_argument(parser)
    cluster_secret.add_argument(parser)
    parser.add_argument(
        "--max-workers",
        type=int,
        help=f"gRPC threads (default: enough for every member to long-poll twice, at least "
        f"{DEFAULT_MAX_WORKERS})",
    )
    args = parser.parse_args(argv)
    if args.discovery == STATIC and None in (args.attention_instances, args.ffn_instances):
        parser.error(
            "--attention-instances and --ffn-instances are required (or --discovery "
            "kubernetes in a cluster)"
        )
    if args.discovery == KUBERNETES and not args.kube_selector:
        parser.error("--discovery kubernetes needs --kube-selector (the release's labels)")
    return args


def cluster_size(args: argparse.Namespace) -> tuple[tuple[int, int], KubernetesDiscovery | None]:
    """(attention, FFN) instances to expect, and the discovery that follows changes."""
    if args.discovery == STATIC:
        return (args.attention_instances, args.ffn_instances), None
    target = Target(args.kube_namespace or default_namespace(), args.kube_selector)
    discovery = KubernetesDiscovery(*kubernetes_apis(), target)
    return discovery.size(DISCOVERY_TIMEOUT_S), discovery


def watch_members(metrics: ControllerMetrics, registry: Registry) -> None:
    """Members by role and state, and the epoch, read when Prometheus scrapes."""
    for role in ROLES:
        for state in MEMBER_STATES:
            metrics.members.labels(role, state).set_function(
                lambda role=role, state=state: registry.count(role, state, SILENT_AFTER_S)
            )
    metrics.epoch.set_function(lambda: registry.epoch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prometheus = service_registry("controller")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        fingerprint = args.fingerprint or model_fingerprint(args.model)
        (num_attention, num_ffn), discovery = cluster_size(args)
        spec = ClusterSpec(num_attention, num_ffn, ClusterConfig.from_args(args), fingerprint)
        store_host = args.advertise_host or reachable_host(args.host)
        # Members wrap it in a PrefixStore per epoch; nobody waits for workers here.
        store = TCPStore(args.host, args.store_port, is_master=True, wait_for_workers=False)
        metrics = ControllerMetrics(prometheus)
        steps = StepDesk(on_open=metrics.step_openings.inc)
        registry = Registry(
            spec, store_host, store.port, silent_after_s=args.member_timeout, on_change=steps.change
        )
        watch_members(metrics, registry)
        servicer = ControllerServicer(registry, steps)
        # A long-poll holds a thread; a member may hold two (a step wait and a heartbeat).
        # A cluster that can be scaled gets room for four times its starting size.
        num_members = len(spec.slots())
        if discovery is not None:
            num_members *= 4
        max_workers = args.max_workers or max(DEFAULT_MAX_WORKERS, 2 * num_members + 16)
        secret = cluster_secret.load(args.cluster_secret_file)
        server = GrpcServer(ERROR_CODES, max_workers, secret=secret)
        wire.add_controller_to_server(servicer, server.server)
        port = server.bind(args.host, args.port)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"controller: error: {err}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    server.set_serving(True, ("", wire.SERVICE_NAME))
    if discovery is not None:
        discovery.start(registry)
        log.info("following %s in %s", discovery.target.selector, discovery.target.namespace)
    log.info(
        "expecting %d attention and %d FFN instance(s), %s, model %s; TCPStore on %s:%d; %s",
        spec.num_attention_instances,
        spec.num_ffn_instances,
        spec.config,
        spec.fingerprint,
        store_host,
        store.port,
        "members must hold the cluster secret" if secret else "no cluster secret: open to all",
    )
    serve_metrics(prometheus, args.host, args.metrics_port)  # before: `afd serve` reads both
    print(f"controller listening on {args.host}:{port}", flush=True)

    while not stop.wait(TICK_S):
        registry.tick()
    log.info("stopping")
    if discovery is not None:
        discovery.stop()
    servicer.shut_down()
    server.stop(STOP_GRACE_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
