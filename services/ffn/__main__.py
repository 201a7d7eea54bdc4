"""`afd ffn --index I --controller HOST:PORT --model DIR`: one FFN instance, or one process
of an FFN instance of G (the cluster's `--gpus-per-ffn-instance`): then I is the process's
FFN place, instance x G + position, and its peers are the places beside it.

It reads its share of every layer's feed-forward weights, joins the cluster, and then runs
steps until the cluster shuts down: while the cluster is busy one after another, each sized
by the attention instances' headers; after an idle step it waits for the controller to say
an attention instance opened the next one.
When the epoch ends (a peer died mid-step, the controller says the cluster moved on, or the
cluster was scaled), it joins the next one and goes on, with the same weights or, when the
FFN count changed, its new share (loader.py). SIGTERM: it leaves the cluster (which waits for
a replacement to hold these experts, unless the FFN side was scaled down) and exits.
The cluster's facts (layout, micro-batches, token budget, FP8 dispatch) are not its flags: it
reads them from the controller before loading (services/common/cluster_config.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from services.common.config import load_config
from services.common.control_client import (
    ClusterShutdown,
    ControlError,
    Membership,
)
from services.common.ffn_instances import instance_ranks
from services.common.instance import Instance, InstanceOptions, add_instance_arguments
from services.common.metrics import (
    DataPlaneBytes,
    FFNMetrics,
    sampler_for,
    serve_metrics,
    service_registry,
)
from services.common.model.build import resolve_dtype
from services.common.transport import PeerFailure, Transport
from services.ffn.instance_group import InstanceGroup
from services.ffn.loader import ShardLoader, expected_ffn_count
from services.ffn.worker import FFNMonitor, FFNWorker

log = logging.getLogger("services.ffn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_instance_arguments(parser)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run each micro-batch's FFN layer eagerly on a GPU",
    )
    parser.add_argument(
        "--instance-size",
        type=int,
        metavar="G",
        help="the processes its FFN instance runs (`afd ffn-pod` passes it): it stops, saying "
        "so, when the cluster's --gpus-per-ffn-instance differs",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = InstanceOptions.from_args("ffn", args)
    cfg = load_config(args.model)
    dtype = resolve_dtype(args.dtype, cfg)
    instance = Instance(options)
    try:
        # The layout, pipeline depth, token budget and wire format are the cluster's: the
        # controller's, read before loading (the share depends on the layout).
        state = instance.cluster_state()
        cluster = state.config
        if args.instance_size not in (None, cluster.ffn_instance_size):
            raise ValueError(
                f"this pod runs FFN instances of {args.instance_size} processes but the "
                f"cluster's are of {cluster.ffn_instance_size} (the controller's "
                "--gpus-per-ffn-instance): give both the same count (the chart's "
                "ffn.gpusPerInstance)"
            )
        loader = ShardLoader(
            args.model, cfg, dtype, options.device, options.index, cluster.ffn_layout
        )
        shard = loader.load(expected_ffn_count(state, options.index))
        registry = service_registry("ffn")
        DataPlaneBytes(registry, lambda: dict(instance.traffic.bytes))
        monitor = FFNMonitor(
            FFNMetrics(registry), sampler_for(options.device.type), shard.expert_range
        )
        membership, transport = instance.join()
        worker = FFNWorker(
            cfg,
            shard,
            transport,
            membership.attention_ranks,
            cluster.num_micro_batches,
            cluster.max_num_batched_tokens,
            dtype,
            options.device,
            cluster.fp8_dispatch,
            monitor,
            summarises=first_ffn(instance, membership),
            cuda_graphs=not args.enforce_eager,
            instance=instance_group(instance),
        )
        del shard  # the worker's from now on: a re-shard must be able to free it
        loader.refit(worker, membership)
        serve_metrics(registry, options.host, args.metrics_port)
        instance.wait_for_peers()
        instance.server.set_serving(True)
        print(f"{instance.name} serving on {instance.address}", flush=True)
        while (why := serve(worker, instance)) is not None:
            instance.server.set_serving(False)
            joined = rejoin(instance, why, lambda m: loader.refit(worker, m))
            if joined is None:
                break
            membership, transport = joined
            worker.rebind(
                transport,
                membership.attention_ranks,
                first_ffn(instance, membership),
                instance_group(instance),
            )
            instance.server.set_serving(True)
        instance.leave()
        return 0
    finally:
        instance.close()


def rejoin(
    instance: Instance, why: str, prepare: Callable[[Membership], None]
) -> tuple[Membership, Transport] | None:
    """Join the next epoch, trying again until it forms (the cluster cannot serve without
    these experts, so giving up helps nobody); None if told to stop meanwhile. `prepare`
    runs once the epoch formed, before this instance says it is ready."""
    while not instance.stopping.is_set():
        try:
            return instance.rejoin(why, prepare=prepare)
        except (ClusterShutdown, InterruptedError):
            return None
        except (TimeoutError, ConnectionError, ControlError, RuntimeError) as err:
            why = f"joining the next epoch failed: {err}"
    return None


def first_ffn(instance: Instance, membership: Membership) -> bool:
    """Whether this is (a process of) the epoch's first FFN instance: it summarises every
    step to the attention instances it is the door of."""
    return instance.rank in instance_ranks(membership)[0]


def instance_group(instance: Instance) -> InstanceGroup | None:
    """This process's FFN instance's exchange, where the instance is several processes."""
    return None if instance.ffn_groups is None else InstanceGroup(instance.ffn_groups)


def serve(worker: FFNWorker, instance: Instance) -> str | None:
    """Run the epoch's steps. Returns why the epoch is over for this instance, or None when
    it should stop (SIGTERM, or the cluster shuts down)."""
    epoch, timeout_s = instance.membership.epoch, instance.options.step_timeout_s
    # Idle waits are long-polled in short rounds, so a stale epoch is noticed within one.
    poll_s = min(timeout_s, 1.0)
    step, idle = 0, True  # an epoch starts idle: its first step is opened by the controller
    while not instance.stopping.is_set():
        if idle:
            try:
                opened = instance.control.await_step(epoch, step, poll_s)
            except ClusterShutdown:
                return None
            except (ControlError, ConnectionError) as err:  # the epoch is over, or the
                return str(err)  # controller restarts: either way, join the next one
            except TimeoutError:
                opened = False
            if not opened:
                # No step for a while: an idle cluster, not a fault (a peer that fails inside
                # a step is caught by the data plane). Keep waiting, unless it moved on.
                if instance.needs_rejoin():
                    return f"the cluster moved past epoch {epoch}"
                continue
        try:
            idle = worker.run_step(step) == 0
        except PeerFailure as err:
            return str(err)
        step += 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd ffn", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
