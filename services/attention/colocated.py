"""`afd attention --colocated`: the whole model, attention and experts, in one process.

No controller, no FFN instances and no data plane: the same engine and the same attention
API as a disaggregated instance, with the local runner behind them. It is the baseline AFD
is measured against (`afd serve --colocated`): same weights, same scheduler, same gateway.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import torch

from services.attention.api import ERROR_CODES, add_attention_service
from services.attention.builder import local_engine
from services.attention.driver import EngineDriver
from services.attention.engine import EngineConfig
from services.attention.monitor import EngineMonitor
from services.common import cluster_secret
from services.common.grpc_server import GrpcServer
from services.common.metrics import AttentionMetrics, serve_metrics, service_registry
from services.common.model.build import load_model
from services.common.tokenizer import Tokenizer
from services.common.wire.attention import SERVICE_NAME

log = logging.getLogger("services.attention")


def serve_colocated(args: argparse.Namespace, config: EngineConfig) -> int:
    name = f"attention instance {args.index} (colocated)"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this machine has no usable CUDA GPU")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    secret = cluster_secret.load(args.cluster_secret_file)
    server = GrpcServer(
        ERROR_CODES, max_workers=2 * config.scheduler.max_num_seqs + 16, secret=secret
    )
    port = server.bind(args.host, args.port)
    server.start()
    try:
        model = load_model(args.model, args.dtype, str(device))
        engine = local_engine(model, config, Tokenizer.from_dir(args.model))
        registry = service_registry("attention")
        monitor = EngineMonitor(engine, AttentionMetrics(registry))
        # Nothing to keep in lockstep with: an idle instance sleeps.
        driver = EngineDriver(engine, idle_wait_s=0.01, on_step=monitor.after_step)
        serve_metrics(registry, args.host, args.metrics_port)
        add_attention_service(server.server, driver)
        driver.start()
        server.set_serving(True, ("", SERVICE_NAME))
        print(f"{name} serving on {args.host}:{port}", flush=True)
        while not stopping.wait(0.2):
            if driver.failure is not None:
                log.error("%s stops: %s", name, driver.failure)
                return 1
        driver.stop()
        return 0
    finally:
        server.stop(grace_s=1.0)
