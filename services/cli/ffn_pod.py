"""`afd ffn-pod --index F --processes G [afd ffn flags]`: every process of FFN instance F, on
one machine (a Kubernetes pod of G GPUs).

Process p is `afd ffn --index F x G + p` (its FFN place) on GPU p (`--device cuda` becomes
cuda:p) with gRPC on `--port` + p and metrics on `--metrics-port` + p, so the processes of one
pod never ask for the same port. The other flags go to every process as they are. A process
that dies is started again (supervisor.py), so the instance comes back as the cluster
re-forms, without reloading the shares of the processes that lived; one that keeps dying at
once ends the pod with an error (Kubernetes then restarts it). SIGTERM goes to every
process, which leave the cluster; the pod exits when they have, or when the cluster shut
down (every process exited cleanly).
"""

from __future__ import annotations

import argparse
import signal
import threading

from services.cli.local_cluster import LocalCluster
from services.cli.supervisor import Supervisor
from services.common.cluster import FFN, place_name

STOP_TIMEOUT_S = 50.0  # within the pod's 60 s termination grace period


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "ffn-pod",
        help="run every process of one FFN instance of several GPUs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", type=int, required=True, metavar="F", help="FFN instance")
    parser.add_argument(
        "--processes", type=int, required=True, metavar="G", help="the cluster's GPUs per FFN "
        "instance (the controller's --gpus-per-ffn-instance)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: process p on cuda:p")
    parser.add_argument("--port", type=int, default=0, help="process p's gRPC: PORT + p")
    parser.add_argument("--metrics-port", type=int, help="process p's metrics: PORT + p")
    parser.set_defaults(run=run, passes_unknown=True)


def child_args(args: argparse.Namespace, position: int) -> list[str]:
    """`afd ffn`'s command line for process `position` of the instance."""
    device = f"cuda:{position}" if args.device == "cuda" else args.device
    place = args.index * args.processes + position
    command = ["ffn", "--index", str(place), "--instance-size", str(args.processes)]
    command += ["--device", device]
    command += ["--port", str(args.port + position) if args.port else "0"]
    if args.metrics_port is not None:
        command += ["--metrics-port", str(args.metrics_port + position if args.metrics_port else 0)]
    return command + args.rest


def run(args: argparse.Namespace) -> int:
    if args.index < 0 or args.processes < 1:
        raise ValueError(f"--index must be >= 0 and --processes >= 1, got {args.index}, "
                         f"{args.processes}")  # fmt: skip
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (process p takes cuda:p), got "
                         f"{args.device!r}")  # fmt: skip
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pod = LocalCluster(args.processes)
    try:
        for position in range(args.processes):
            name = place_name(FFN, args.index * args.processes + position, args.processes)
            pod.start(name, child_args(args, position))
        supervisor = Supervisor(pod, restart_clean_exits=False)
        while not stop.wait(0.2):
            codes = [child.process.poll() for child in pod.children]
            if all(code == 0 for code in codes):
                return 0  # the cluster shut down, or every process left it
            supervisor.check()
        return 0
    finally:
        pod.stop(STOP_TIMEOUT_S)
