"""`afd serve --model DIR`: a whole disaggregated cluster on this machine (127.0.0.1).

Starts the controller, M attention and N FFN instances (each of G processes with
`--gpus-per-ffn-instance G`) and the OpenAI-compatible gateway as separate processes, prints
where they listen, restarts any of them that dies (as Kubernetes would: supervisor.py), and
on Ctrl-C or SIGTERM drains and stops all of them: the gateway and the attention instances
first (they finish the requests in flight), then the FFN instances and the controller. With
`--colocated` it starts M instances that each hold the whole model instead (no controller,
no FFN instances) behind the same gateway: the baseline that AFD is compared with on the
same machine, model and load.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from services.cli.local_cluster import LocalCluster
from services.cli.supervisor import Supervisor
from services.common import cluster_config, cluster_secret
from services.common.cluster import FFN, place_name
from services.common.cluster_config import ClusterConfig

READY_TIMEOUT_S = 300.0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve", help="run a whole AFD cluster locally", description=__doc__
    )
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--attention-instances", type=int, default=1, metavar="M")
    parser.add_argument("--ffn-instances", type=int, metavar="N", help="default 1")
    # The cluster's facts, handed to the controller, which gives them to every instance.
    cluster_config.add_arguments(parser)
    parser.add_argument(
        "--colocated",
        action="store_true",
        help="no disaggregation: each of the M instances holds attention and experts",
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--step-timeout", type=float, default=30.0)
    parser.add_argument(
        "--recovery-timeout",
        type=float,
        default=60.0,
        help="seconds instances wait for the cluster to re-form after a failure",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on Ctrl-C / SIGTERM, seconds requests in flight may take to finish",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address of every process")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer) at the API")
    parser.add_argument(
        "--tpot-sla-ms",
        type=float,
        default=50.0,
        help="the gateway's TPOT target: it admits fewer running requests while TPOT is above",
    )
    parser.add_argument("--no-gateway", action="store_true", help="attention API (gRPC) only")
    parser.add_argument("--chat-template", metavar="FILE", help="the gateway's (afd gateway)")
    parser.add_argument(
        "--reasoning-parser", choices=("step3", "none"), help="the gateway's (afd gateway)"
    )
    parser.add_argument(
        "--prometheus-targets",
        metavar="FILE",
        help="write every process's metrics endpoint here once the cluster is up, as a "
        "Prometheus file_sd target list (labels: component, index)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8"),
        default="auto",
        help="what attention instances store K/V in: the model's dtype, or fp8 (e4m3)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on a GPU, no CUDA graphs: colocated decode steps and FFN instances' layers run "
        "eagerly",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: one GPU per instance, round-robin over this machine's GPUs "
        "(NCCL needs a GPU of its own for every instance)",
    )
    parser.set_defaults(run=run)


AFD_ONLY = ("ffn_instances", "micro_batches", "ffn_layout", "fp8_dispatch", "gpus_per_ffn_instance")


def validate(args: argparse.Namespace) -> None:
    """Checks the options, fills in --ffn-instances' default and sets `args.cluster`, the
    cluster's facts (checked here, so a bad one fails before any process starts)."""
    afd_only = [name for name in AFD_ONLY if getattr(args, name) is not None]
    if args.colocated and afd_only:
        options = ", ".join("--" + name.replace("_", "-") for name in afd_only)
        raise ValueError(f"--colocated runs no FFN instances: drop {options}")
    if args.ffn_instances is None:
        args.ffn_instances = 1
    for name in ("attention_instances", "ffn_instances"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    args.cluster = ClusterConfig.from_args(args)


def instance_devices(device: str, num_instances: int) -> list[str]:
    if device == "cpu":
        return ["cpu"] * num_instances
    if device != "cuda":
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    import torch  # only here: the launcher itself needs no torch on CPU

    count = torch.cuda.device_count()
    if count < num_instances:
        raise ValueError(
            f"{num_instances} instances need {num_instances} GPUs with NCCL; this machine has "
            f"{count}: use fewer instances or --device cpu"
        )
    return [f"cuda:{i}" for i in range(num_instances)]


def run(args: argparse.Namespace) -> int:
    validate(args)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if args.colocated:
        return run_colocated(args, stop)
    m, n, g = args.attention_instances, args.ffn_instances, args.cluster.ffn_instance_size
    cluster = LocalCluster(m + n * g)
    # Every process of this cluster gets one fresh secret (unless the user set one), so no
    # other process on the machine can join it.
    cluster.env[cluster_secret.ENV] = cluster.env.get(cluster_secret.ENV) or (
        cluster_secret.new_secret()
    )
    try:
        controller = cluster.start("controller", controller_args(args), stage=2)
        address = cluster.wait_ready(controller, READY_TIMEOUT_S)
        common = instance_args(args, address)
        devices = instance_devices(args.device, m + n * g)
        attention = [
            cluster.start(
                f"attention instance {i}",
                [
                    "attention",
                    "--index",
                    str(i),
                    "--device",
                    devices[i],
                    *common,
                    "--kv-cache-dtype",
                    args.kv_cache_dtype,
                    "--drain-timeout",
                    str(args.drain_timeout),
                ],  # fmt: skip
            )
            for i in range(m)
        ]
        ffn = [
            cluster.start(
                place_name(FFN, i, g),
                [
                    "ffn",
                    "--index",
                    str(i),
                    "--device",
                    devices[m + i],
                    *common,
                    *(["--enforce-eager"] if args.enforce_eager else []),
                ],
                stage=1,
            )  # fmt: skip
            for i in range(n * g)  # the FFN places: instance x G + process
        ]
        addresses = [cluster.wait_ready(child, READY_TIMEOUT_S) for child in attention]
        for child in ffn:
            cluster.wait_ready(child, READY_TIMEOUT_S)
        serve_until_stopped(cluster, args, address, addresses, stop)
        return 0
    finally:
        cluster.stop(args.drain_timeout)


def run_colocated(args: argparse.Namespace, stop: threading.Event) -> int:
    m = args.attention_instances
    cluster = LocalCluster(m)
    try:
        devices = instance_devices(args.device, m)
        instances = [
            cluster.start(
                f"attention instance {i}",
                [
                    "attention",
                    "--colocated",
                    "--index",
                    str(i),
                    "--device",
                    devices[i],
                    "--model",
                    args.model,
                    "--host",
                    args.host,
                    "--dtype",
                    args.dtype,
                    "--max-num-batched-tokens",
                    str(args.cluster.max_num_batched_tokens),
                    "--metrics-port",
                    "0",
                    "--kv-cache-dtype",
                    args.kv_cache_dtype,
                    *(["--enforce-eager"] if args.enforce_eager else []),
                ],
            )  # fmt: skip
            for i in range(m)
        ]
        addresses = [cluster.wait_ready(child, READY_TIMEOUT_S) for child in instances]
        serve_until_stopped(cluster, args, None, addresses, stop)
        return 0
    finally:
        cluster.stop(args.drain_timeout)


def serve_until_stopped(
    cluster: LocalCluster,
    args: argparse.Namespace,
    controller: str | None,
    addresses: list[str],
    stop: threading.Event,
) -> None:
    """Announce the instances, start the gateway, and watch every child until told to stop."""
    cluster.say("cluster ready: attention instances at " + " ".join(addresses))
    if not args.no_gateway:
        gateway = cluster.start("gateway", gateway_args(args, controller, addresses))
        address = cluster.wait_ready(gateway, READY_TIMEOUT_S)
        gateway.metrics = address.removeprefix("http://")  # /metrics beside the API
    targets = metrics_targets(cluster)
    cluster.say("metrics at " + " ".join(f"{t['targets'][0]}" for t in targets))
    if args.prometheus_targets:
        Path(args.prometheus_targets).write_text(json.dumps(targets, indent=2) + "\n")
    supervisor = Supervisor(cluster)
    while not stop.wait(0.2):
        supervisor.check()


def metrics_targets(cluster: LocalCluster) -> list[dict]:
    """Each child's metrics endpoint as a Prometheus file_sd entry: "attention instance 1"
    becomes component attention, index 1; "ffn instance 1 process 0" component ffn, index 1,
    process 0. (Not "role": the controller's own metrics carry a
    `role` label, which a target label of that name would rename.)"""
    targets = []
    for child in cluster.children:
        if child.metrics is None:
            continue
        component, _, place = child.name.partition(" instance ")
        index, _, process = place.partition(" process ")
        labels = {"component": component} | ({"index": index} if index else {})
        labels |= {"process": process} if process else {}
        targets.append({"targets": [child.metrics], "labels": labels})
    return targets


def controller_args(args: argparse.Namespace) -> list[str]:
    """The controller's command line: the cluster's facts are given to it alone."""
    cluster: ClusterConfig = args.cluster
    controller = [
        "controller", "--host", args.host, "--port", "0", "--model", args.model,
        "--attention-instances", str(args.attention_instances),
        "--ffn-instances", str(args.ffn_instances),
        "--micro-batches", str(cluster.num_micro_batches),
        "--max-num-batched-tokens", str(cluster.max_num_batched_tokens),
        "--ffn-layout", cluster.ffn_layout, "--metrics-port", "0",
        "--gpus-per-ffn-instance", str(cluster.ffn_instance_size),
    ]  # fmt: skip
    return [*controller, "--fp8-dispatch"] if cluster.fp8_dispatch else controller


def instance_args(args: argparse.Namespace, controller: str) -> list[str]:
    return [
        "--controller", controller, "--model", args.model, "--host", args.host,
        "--dtype", args.dtype, "--step-timeout", str(args.step_timeout),
        "--recovery-timeout", str(args.recovery_timeout), "--metrics-port", "0",
    ]  # fmt: skip


def gateway_args(
    args: argparse.Namespace, controller: str | None, attention: list[str]
) -> list[str]:
    gateway = ["gateway", "--model", args.model]
    if controller:
        gateway += ["--controller", controller]
    for address in attention:
        gateway += ["--attention", address]
    gateway += ["--host", args.host, "--port", str(args.port)]
    gateway += ["--tpot-sla-ms", str(args.tpot_sla_ms), "--drain-timeout", str(args.drain_timeout)]
    if args.api_key:
        gateway += ["--api-key", args.api_key]
    if args.chat_template:
        gateway += ["--chat-template", str(Path(args.chat_template).resolve())]
    if args.reasoning_parser:
        gateway += ["--reasoning-parser", args.reasoning_parser]
    return gateway
