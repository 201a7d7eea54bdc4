"""`afd ffn --index I --controller HOST:PORT --model DIR`: one FFN instance.

It holds its share of every layer's feed-forward weights, joins the cluster, and then runs
one step per plan from the controller until the cluster shuts down. The next step's plan is
fetched while the current step computes, so it is there before that step's first transfer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor

from prometheus_client import CollectorRegistry

from services.common.config import load_config
from services.common.control_client import ClusterShutdown, ControlClient
from services.common.instance import Instance, InstanceOptions, add_instance_arguments
from services.common.metrics import FFNMetrics, sampler_for, serve_metrics
from services.common.model.build import resolve_dtype
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.model.weights import load_weights, stored_fp8
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
        spec = ShardSpec(options.index, len(membership.ffn_ranks), args.layout)
        names = [n for n in checkpoint_tensors(cfg) if is_ffn_tensor(n)]
        tensors = load_weights(args.model, cfg, dtype=dtype, device=options.device, names=names)
        # A block-FP8 checkpoint's experts stay FP8 on a GPU (requantised to per-row scales).
        fp8_experts = options.device.type == "cuda" and any(
            ".moe." in name for name in stored_fp8(args.model, cfg)
        )
        registry = CollectorRegistry()
        first, end = spec.range_of(cfg.moe_num_experts)
        monitor = FFNMonitor(
            FFNMetrics(registry), sampler_for(options.device.type), range(first, end)
        )
        worker = FFNWorker(
            cfg,
            FFNShard(cfg, spec, tensors, fp8_experts),
            transport,
            membership.attention_ranks,
            membership.num_micro_batches,
            args.max_num_batched_tokens,
            dtype,
            options.device,
            args.fp8_dispatch,
            monitor,
        )
        del tensors
        serve_metrics(registry, options.host, args.metrics_port)
        instance.wait_for_peers()
        instance.server.set_serving(True)
        print(f"{options.name} serving on {instance.address}", flush=True)
        serve(worker, instance.control, membership.epoch, options.step_timeout_s, instance)
        return 0
    finally:
        instance.close()


def serve(
    worker: FFNWorker, control: ControlClient, epoch: int, timeout_s: float, instance: Instance
) -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="plan") as prefetch:

        def fetch(step: int) -> Future:
            return prefetch.submit(control.get_plan, epoch, step, timeout_s)

        step, plan = 0, fetch(0)
        while not instance.stopping.is_set():
            try:
                counts = plan.result()
            except ClusterShutdown:
                return
            except TimeoutError:
                # No step for a while: an idle cluster, not a fault (a peer that fails inside
                # a step is caught by the data plane's timeout). Keep waiting.
                plan = fetch(step)
                continue
            step, plan = step + 1, fetch(step + 1)
            worker.run_step(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd ffn", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
