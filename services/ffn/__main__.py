"""`afd ffn --index I --controller HOST:PORT --model DIR`: one FFN instance.

It holds its share of every layer's feed-forward weights, joins the cluster, and then runs
one step per plan from the controller until the cluster shuts down. The next step's plan is
fetched while the current step computes, so it is there before that step's first transfer.
When the epoch ends (a peer died mid-step, or the controller says the cluster moved on), it
joins the next one with the same weights and goes on. SIGTERM: it leaves the cluster (which
waits for a replacement to hold these experts) and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from prometheus_client import CollectorRegistry

from services.common.config import ModelConfig, load_config
from services.common.control_client import (
    ClusterShutdown,
    ControlError,
    Membership,
)
from services.common.instance import Instance, InstanceOptions, add_instance_arguments
from services.common.metrics import FFNMetrics, sampler_for, serve_metrics
from services.common.model.build import resolve_dtype
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.model.weights import load_weights, stored_fp8
from services.common.transport import PeerFailure, Transport
from services.ffn.layouts import LAYOUTS, SPLIT
from services.ffn.shard import FFNShard, ShardSpec
from services.ffn.worker import FFNMonitor, FFNWorker

log = logging.getLogger("services.ffn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_instance_arguments(parser)
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=SPLIT,
        help="dense MLPs and the shared expert: split across FFN instances (partial sums) or "
        "replicated on each",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="the attention instances' per-step token budget (sizes the receive buffers)",
    )
    parser.add_argument("--fp8-dispatch", action="store_true", help="activations arrive as FP8")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = InstanceOptions.from_args("ffn", args)
    cfg = load_config(args.model)
    dtype = resolve_dtype(args.dtype, cfg)
    instance = Instance(options)
    try:
        membership, transport = instance.join()
        shard = load_shard(args, cfg, dtype, options, len(membership.ffn_ranks))
        registry = CollectorRegistry()
        monitor = FFNMonitor(
            FFNMetrics(registry), sampler_for(options.device.type), shard.expert_range
        )
        worker = FFNWorker(
            cfg,
            shard,
            transport,
            membership.attention_ranks,
            membership.num_micro_batches,
            args.max_num_batched_tokens,
            dtype,
            options.device,
            args.fp8_dispatch,
            monitor,
        )
        serve_metrics(registry, options.host, args.metrics_port)
        instance.wait_for_peers()
        instance.server.set_serving(True)
        print(f"{options.name} serving on {instance.address}", flush=True)
        while (why := serve(worker, instance)) is not None:
            instance.server.set_serving(False)
            joined = rejoin(instance, why)
            if joined is None:
                break
            membership, transport = joined
            num_ffn = len(membership.ffn_ranks)
            if num_ffn != worker.shard.spec.num_shards:  # the FFN side was scaled
                log.info("re-sharding for %d FFN instances", num_ffn)
                worker.reshard(None)  # the old share's memory is free before the new loads
                worker.reshard(load_shard(args, cfg, dtype, options, num_ffn))
            worker.rebind(transport, membership.attention_ranks)
            instance.server.set_serving(True)
        instance.leave()
        return 0
    finally:
        instance.close()


def load_shard(
    args: argparse.Namespace,
    cfg: ModelConfig,
    dtype: torch.dtype,
    options: InstanceOptions,
    num_ffn: int,
) -> FFNShard:
    """This instance's share of the feed-forward weights when there are `num_ffn`."""
    spec = ShardSpec(options.index, num_ffn, args.layout)
    names = [n for n in checkpoint_tensors(cfg) if is_ffn_tensor(n)]
    tensors = load_weights(args.model, cfg, dtype=dtype, device=options.device, names=names)
    # A block-FP8 checkpoint's experts stay FP8 on a GPU (requantised to per-row scales).
    fp8_experts = options.device.type == "cuda" and any(
        ".moe." in name for name in stored_fp8(args.model, cfg)
    )
    return FFNShard(cfg, spec, tensors, fp8_experts)


def rejoin(instance: Instance, why: str) -> tuple[Membership, Transport] | None:
    """Join the next epoch, trying again until it forms (the cluster cannot serve without
    these experts, so giving up helps nobody); None if told to stop meanwhile."""
    while not instance.stopping.is_set():
        try:
            return instance.rejoin(why)
        except (ClusterShutdown, InterruptedError):
            return None
        except (TimeoutError, ConnectionError, ControlError, RuntimeError) as err:
            why = f"joining the next epoch failed: {err}"
    return None


def serve(worker: FFNWorker, instance: Instance) -> str | None:
    """Run the epoch's steps. Returns why the epoch is over for this instance, or None when
    it should stop (SIGTERM, or the cluster shuts down)."""
    epoch, timeout_s = instance.membership.epoch, instance.options.step_timeout_s
    # Plans are long-polled in short rounds, so a stale epoch is noticed within one.
    poll_s = min(timeout_s, 1.0)
    with ThreadPoolExecutor(1, thread_name_prefix="plan") as prefetch:

        def fetch(step: int) -> Future:
            return prefetch.submit(instance.control.get_plan, epoch, step, poll_s)

        step, plan = 0, fetch(0)
        while not instance.stopping.is_set():
            try:
                counts = plan.result()
            except ClusterShutdown:
                return None
            except (ControlError, ConnectionError) as err:  # the epoch is over, or the
                return str(err)  # controller restarts: either way, join the next one
            except TimeoutError:
                # No step for a while: an idle cluster, not a fault (a peer that fails inside
                # a step is caught by the data plane). Keep waiting, unless it moved on.
                if instance.needs_rejoin():
                    return f"the cluster moved past epoch {epoch}"
                plan = fetch(step)
                continue
            step, plan = step + 1, fetch(step + 1)
            try:
                worker.run_step(counts)
            except PeerFailure as err:
                return str(err)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd ffn", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
