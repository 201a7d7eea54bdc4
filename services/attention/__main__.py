"""`afd attention --index I --controller HOST:PORT --model DIR`: one attention instance.

It holds the KV cache, the attention weights, the router, the LM head and sampling, joins
the cluster, and serves the attention API (health included) until stopped. Prints
`attention instance I serving on HOST:PORT` once requests can be sent. When the cluster
re-forms (a peer died, left or joined) it joins the next epoch and its requests go on
(recovery.py). SIGTERM drains it: it stops admitting, finishes the requests in flight
(at most --drain-timeout), leaves the cluster and exits 0.
The cluster's facts (micro-batches, the token budget, FP8 dispatch) are not its flags: it
takes them from the controller (services/common/cluster_config.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from services.attention.api import ERROR_CODES, add_attention_service
from services.attention.colocated import serve_colocated
from services.attention.driver import EngineDriver
from services.attention.engine import (
    KV_CACHE_DTYPES,
    Engine,
    EngineConfig,
    default_num_kv_blocks,
    max_model_len,
)
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.attention.monitor import EngineMonitor, PipelineMonitor
from services.attention.recovery import ClusterRecovery
from services.attention.remote_ffn import PipelineConfig, RemoteFFN
from services.attention.scheduler import SchedulerConfig
from services.attention.step_bell import StepBell
from services.common.cluster_config import DEFAULT_MAX_NUM_BATCHED_TOKENS
from services.common.config import load_config
from services.common.ffn_instances import door_ranks
from services.common.instance import Instance, InstanceOptions, add_instance_arguments
from services.common.metrics import (
    AttentionMetrics,
    DataPlaneBytes,
    sampler_for,
    serve_metrics,
    service_registry,
)
from services.common.model.build import build_attention_half, fp8_weights_on, resolve_dtype
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.model.weights import load_weights
from services.common.tokenizer import Tokenizer
from services.common.wire.attention import SERVICE_NAME

log = logging.getLogger("services.attention")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help=f"with --colocated: tokens computed per step (default "
        f"{DEFAULT_MAX_NUM_BATCHED_TOKENS}); a disaggregated instance takes the cluster's, "
        "from the controller",
    )
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument(
        "--kv-cache-dtype",
        choices=tuple(KV_CACHE_DTYPES),
        default="auto",
        help="auto: the model's dtype; fp8: e4m3, twice the tokens in the same memory",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs: run decode steps eagerly on a GPU (a disaggregated instance's "
        "segments between transfers too)",
    )


def engine_config(args: argparse.Namespace, max_num_batched_tokens: int) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        scheduler=SchedulerConfig(args.max_num_seqs, max_num_batched_tokens),
        enable_prefix_caching=not args.no_prefix_caching,
        cuda_graphs=not args.enforce_eager,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_instance_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, how long requests in flight may take to finish before they are ended",
    )
    parser.add_argument(
        "--colocated",
        action="store_true",
        help="hold the experts too: no controller, no FFN instances (the non-AFD baseline)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    budget = args.max_num_batched_tokens
    if args.colocated:
        budget = DEFAULT_MAX_NUM_BATCHED_TOKENS if budget is None else budget
        return serve_colocated(args, engine_config(args, budget))
    if budget is not None:
        raise ValueError(
            "--max-num-batched-tokens is the cluster's, not one instance's: give it to the "
            "controller (afd controller --max-num-batched-tokens), which hands it to every "
            "instance; afd attention takes it only with --colocated"
        )
    options = InstanceOptions.from_args("attention", args)
    cfg = load_config(args.model)
    dtype = resolve_dtype(args.dtype, cfg)
    tokenizer = Tokenizer.from_dir(args.model)
    # Each open Generate stream holds a server thread: room for every running request, plus
    # Cancel, GetLoad and health checks.
    instance = Instance(options, ERROR_CODES, max_workers=2 * args.max_num_seqs + 16)
    try:
        # The token budget, pipeline depth and wire format are the cluster's: the controller's.
        cluster = instance.cluster_state().config
        config = engine_config(args, cluster.max_num_batched_tokens)
        # Loaded before joining: the cluster re-forms around a member only once it can serve
        # (the others would otherwise wait in the rendezvous while a real checkpoint loads).
        names = [n for n in checkpoint_tensors(cfg) if not is_ffn_tensor(n)]
        tensors = load_weights(
            args.model, cfg, dtype=dtype, device=options.device, names=names,
            keep_fp8=fp8_weights_on(options.device),
        )  # fmt: skip
        attention = build_attention_half(cfg, tensors)
        num_blocks = default_num_kv_blocks(cfg, config, dtype)
        cache = KVCache(
            cfg, num_blocks, config.block_size, dtype, options.device, config.kv_dtype(dtype)
        )

        membership, transport = instance.join()

        bell = StepBell(instance.control, options.index)
        bell.rebind(membership.epoch)
        registry = service_registry("attention")
        metrics = AttentionMetrics(registry)
        DataPlaneBytes(registry, lambda: dict(instance.traffic.bytes))
        pipeline = PipelineConfig(cluster.num_micro_batches, cluster.fp8_dispatch)
        ffn = RemoteFFN(
            cfg,
            dtype,
            options.device,
            transport,
            door_ranks(membership, instance.rank),  # one process of each FFN instance
            len(membership.attention_ranks),
            bell,
            pipeline,
            config.scheduler.max_num_batched_tokens,
            metrics.control_wait.observe,
        )
        monitor = PipelineMonitor(metrics, sampler_for(options.device.type))
        runner = ModelRunner(attention, ffn, cache, pipeline.num_micro_batches, monitor)
        if config.cuda_graphs and cache.decode_kernel:
            # Each micro-batch's GPU work between two transfers replays from a graph.
            per_slot = min(config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens)
            runner.use_graphs(per_slot, max_model_len(cfg, config, num_blocks))
        engine = Engine(runner, num_blocks, config, tokenizer)
        recovery = ClusterRecovery(instance, ffn)
        # While any attention instance is busy every one takes each step (an idle one with
        # no tokens), so the FFN instances hear from all; an idle cluster sleeps.
        driver = EngineDriver(
            engine,
            must_step=ffn.must_step,
            idle_wait_s=0.01,
            on_step=EngineMonitor(engine, metrics).after_step,
            recovery=recovery,
        )
        recovery.driver = driver
        bell.on_ring = driver.wake  # a peer opened a step: take part at once
        serve_metrics(registry, options.host, args.metrics_port)
        add_attention_service(instance.server.server, driver)
        instance.wait_for_peers()
        driver.start()
        instance.server.set_serving(True, ("", SERVICE_NAME))
        print(f"{options.name} serving on {instance.address}", flush=True)
        while not instance.stopping.wait(0.2):
            if driver.failure is not None:
                log.error("%s stops: %s", options.name, driver.failure)
                return 1
        instance.server.set_serving(False, ("", SERVICE_NAME))
        if not driver.drain(args.drain_timeout):
            log.warning(
                "%s: %d request(s) still running after the %g s drain timeout are ended",
                options.name,
                driver.open_requests,
                args.drain_timeout,
            )
        driver.stop()
        bell.close()
        instance.leave()
        return 0
    finally:
        instance.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="afd attention", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
