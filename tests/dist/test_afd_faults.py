"""Faults in a real cluster end in clear errors, never in a hang or a stray process."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.sampling_params import SamplingParams
from services.common.wire.attention import SERVICE_NAME
from services.common.wire.attention_client import AttentionClient
from tests.support.cluster import (
    CLUSTER_SECRET,
    Cluster,
    afd,
    processes_mentioning,
    wait_until_gone,
)
from tests.support.processes import pid_of

STEP_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("afd-faults") / "tiny"
    assert afd("init-checkpoint", str(path), "--preset", "tiny").wait() == 0
    return path


def test_a_hung_ffn_instance_ends_requests_clearly_and_the_cluster_heals_when_it_wakes(
    checkpoint,
):
    recovery_s = 4
    cluster = Cluster(
        "--model", str(checkpoint), "--attention-instances", "1", "--ffn-instances", "2",
        "--dtype", "float32", "--step-timeout", str(STEP_TIMEOUT_S),
        "--recovery-timeout", str(recovery_s),
    )  # fmt: skip
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
            # Readiness says so: the instance cannot serve until the cluster re-forms.
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Stopped, not dead: nothing restarts it, and the cluster cannot re-form without
            # its experts. Once it wakes, it finds its epoch over and joins the next one.
            os.kill(hung, signal.SIGCONT)
            short = SamplingParams(max_tokens=4, temperature=0.0)
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert len(list(client.generate("after", [1, 2, 3], short))) >= 1
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    assert time.monotonic() < deadline, "the cluster did not heal"
                    time.sleep(0.5)
            assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
        assert cluster.process.poll() is None, "afd serve keeps running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
        cluster.stop()
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    message = failure.value.details()
    assert "could not re-form" in message and "ffn instance 1" in message, message
    assert waited < STEP_TIMEOUT_S + recovery_s + 10
    assert wait_until_gone(str(checkpoint)) == []


def test_serve_stops_every_process_on_sigterm(checkpoint):
    cluster = Cluster(
        "--model",
        str(checkpoint),
        "--attention-instances",
        "2",
        "--ffn-instances",
        "1",
        "--dtype",
        "float32",
    )
    assert len(processes_mentioning(str(checkpoint))) == 5  # serve, controller, 2 + 1
    assert cluster.stop() == 0
    assert wait_until_gone(str(checkpoint)) == []
