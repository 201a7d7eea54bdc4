"""One attention instance served in this process for the API tests: a real gRPC server over
a real driver and engine (a tiny float64 model), and a client on a real channel."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc

from services.attention.api import ERROR_CODES, add_attention_service
from services.attention.builder import local_engine
from services.attention.driver import EngineDriver
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.grpc_server import GrpcServer
from services.common.wire import attention as wire
from services.common.wire.attention_client import AttentionClient

NUM_BLOCKS = 64


class WordDecoder:
    """Token i reads " w<i>": prefix-stable text without a real tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)


def make_engine(model):
    config = EngineConfig(
        block_size=4,
        num_kv_blocks=NUM_BLOCKS,
        max_model_len=256,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
    )
    return local_engine(model, config, WordDecoder())


def serve(model, secret: str | None = None):
    """The instance; with `secret`, one that requires the cluster secret (its client holds it)."""
    engine = make_engine(model)
    driver = EngineDriver(engine, idle_wait_s=0.001)
    driver.start()
    server = GrpcServer(ERROR_CODES, max_workers=16, secret=secret)
    add_attention_service(server.server, driver)
    port = server.bind("127.0.0.1", 0)
    server.start()
    server.set_serving(True, ("", wire.SERVICE_NAME))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return SimpleNamespace(
        address=f"127.0.0.1:{port}",
        client=AttentionClient(channel, secret),
        channel=channel,
        driver=driver,
        server=server,
        engine=engine,
    )


def wait_until_idle(client, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = client.load()
        if load.num_running == load.num_waiting == 0:
            return load
        time.sleep(0.005)
    raise AssertionError(f"still busy after {timeout_s} s: {client.load()}")
