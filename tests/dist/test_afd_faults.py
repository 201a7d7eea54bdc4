"""Faults in a real cluster end in clear errors, never in a hang or a stray process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from services.common.sampling_params import SamplingParams
from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import (
    CLUSTER_SECRET,
    Cluster,
    afd,
    processes_mentioning,
    wait_until_gone,
)

STEP_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-faults") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


def pid_of(*words: str) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(word in cmdline for word in words):
                return int(proc.name)
    raise LookupError(f"no process with {words}")


def test_a_hung_ffn_instance_fails_the_step_by_name_and_the_cluster_stops(checkpoint):
    cluster = Cluster(
        "--model", str(checkpoint), "--attention-instances", "1", "--ffn-instances", "2",
        "--dtype", "float32", "--step-timeout", str(STEP_TIMEOUT_S),
    )
    hung = pid_of("ffn --index 1", str(checkpoint))
    params = SamplingParams(max_tokens=5000, temperature=0.0, ignore_eos=True)
    try:
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            client = AttentionClient(channel, CLUSTER_SECRET)
            stream = client.generate("long", [1, 2, 3], params)
            next(stream)  # generation is under way
            os.kill(hung, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as failure:
                for _ in stream:
                    pass
            waited = time.monotonic() - started
        # The attention instance exits on the failure; `afd serve` sees it and stops the rest.
        code = cluster.process.wait(timeout=60)
    finally:
        cluster.stop()
    message = failure.value.details()
    assert "ffn instance 1" in message and "layer" in message, message
    assert waited < STEP_TIMEOUT_S + 10
    assert code != 0
    # Whichever instance gave up first (the attention instance or, starved by it, the other
    # FFN instance), `afd serve` names it and stops the rest.
    assert any("exited with code" in line and "stopping the cluster" in line for line in cluster.lines)
    assert wait_until_gone(str(checkpoint)) == []


def test_serve_stops_every_process_on_sigterm(checkpoint):
    cluster = Cluster(
        "--model", str(checkpoint), "--attention-instances", "2", "--ffn-instances", "1",
        "--dtype", "float32",
    )
    assert len(processes_mentioning(str(checkpoint))) == 5  # serve, controller, 2 + 1
    assert cluster.stop() == 0
    assert wait_until_gone(str(checkpoint)) == []
