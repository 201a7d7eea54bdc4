"""Fixtures of the gateway tests: one tiny cluster per module and gateways in front of it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from services.common.tokenizer import Tokenizer
from tests.support.cluster import Cluster, afd
from tests.support.gateway import API_KEY, start_gateway

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    afd("init-checkpoint", str(folder), "--preset", "tiny", stdout=subprocess.DEVNULL).wait(120)
    return folder


@pytest.fixture(scope="module")
def cluster(checkpoint):
    cluster = Cluster("--model", str(checkpoint), "--dtype", "float32")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def controller_address(cluster) -> str:
    for line in cluster.lines:
        match = re.search(r"controller listening on (\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no controller address in:\n" + "".join(cluster.lines))


@pytest.fixture(scope="module")
def gateway(checkpoint, cluster, controller_address):
    # A generous SLA: a CPU's TPOT must not throttle the concurrency tests.
    attention = [a for address in cluster.addresses for a in ("--attention", address)]
    gateway = start_gateway(
        "--model",
        str(checkpoint),
        *attention,
        "--controller",
        controller_address,
        "--tpot-sla-ms",
        "10000",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def strict_gateway(checkpoint, cluster, tmp_path_factory):
    """Keys required, one running request per instance, no queue."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("sk-from-file\n\n")
    attention = [a for address in cluster.addresses for a in ("--attention", address)]
    gateway = start_gateway(
        "--model",
        str(checkpoint),
        *attention,
        "--api-key",
        API_KEY,
        "--api-key-file",
        str(keys),
        "--max-running",
        "1",
        "--max-queue",
        "0",
        "--served-model-name",
        "strict",
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(checkpoint) -> str:
    return checkpoint.name


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint, tokenizer):
    """The single-process engine over the cluster's checkpoint: the oracle."""
    from services.attention.builder import local_engine
    from services.attention.engine import EngineConfig
    from services.common.model.build import load_model

    return local_engine(
        load_model(checkpoint, dtype="float32", progress=False), EngineConfig(), tokenizer
    )
