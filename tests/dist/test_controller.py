"""The real controller process, driven by the real ControlClient from several threads, as
attention and FFN processes will: membership, refusals, step openings, shutdown, health,
and a clean exit on SIGTERM."""

import contextlib
import re
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch.distributed import TCPStore

from services.common.cluster import Member, Membership
from services.common.cluster_config import ClusterConfig
from services.common.control_client import (
    ClusterShutdown,
    ControlClient,
    ControlError,
    EpochChanged,
)
from services.common.wire import control as wire
from services.common.wire.gen.afd.v1 import control_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
FP = "0123456789abcdef"
SLOTS = [("attention", 0), ("attention", 1), ("ffn", 0), ("ffn", 1)]
START_TIMEOUT_S = 60


@contextlib.contextmanager
def controller(tmp_path, num_attention=2, num_ffn=2):
    """Starts `python -m services.controller` on a free port; yields (process, address)."""
    command = [
        sys.executable, "-m", "services.controller", "--host", "127.0.0.1", "--port", "0",
        "--attention-instances", str(num_attention), "--ffn-instances", str(num_ffn),
        "--micro-batches", "3", "--fingerprint", FP,
    ]  # fmt: skip
    with open(tmp_path / "controller.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        match = re.fullmatch(r"controller listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, f"no listening line: {line!r}\n{(tmp_path / 'controller.log').read_text()}"
        yield process, f"127.0.0.1:{match.group(1)}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()


def in_threads(fn, args_list):
    """Runs fn(*args) in one thread each; returns a function that joins them and gives
    (results, errors) in the order of args_list."""
    results, errors = [None] * len(args_list), [None] * len(args_list)

    def target(i, args):
        try:
            results[i] = fn(*args)
        except Exception as err:  # reported to the test
            errors[i] = err

    threads = [threading.Thread(target=target, args=(i, a)) for i, a in enumerate(args_list)]
    for thread in threads:
        thread.start()

    def join(timeout_s=30):
        for thread in threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a waiting call did not return"
        return results, errors

    return join


def register_everyone(client):
    join = in_threads(
        lambda role, index: client.register(role, index, f"{role}-{index}:7000", FP, 30), SLOTS
    )
    results, errors = join()
    assert errors == [None] * len(SLOTS)
    return results


def test_registration_forms_one_membership_and_refuses_impostors(tmp_path):
    with controller(tmp_path) as (_, address), ControlClient(address) as client:
        memberships = register_everyone(client)
        membership = memberships[0]
        assert all(m == membership for m in memberships)
        assert membership.epoch == 1 and membership.world_size == 4
        assert membership.config == ClusterConfig(num_micro_batches=3)
        assert [(m.role, m.index, m.rank) for m in membership.members] == [
            ("attention", 0, 0),
            ("attention", 1, 1),
            ("ffn", 0, 2),
            ("ffn", 1, 3),
        ]
        assert membership.attention_ranks == [0, 1] and membership.ffn_ranks == [2, 3]

        # The TCPStore it hands out is live.
        store = TCPStore(
            membership.store_host,
            membership.store_port,
            is_master=False,
            timeout=timedelta(seconds=10),
        )
        store.set("epoch-1/probe", "ok")
        assert store.get("epoch-1/probe") == b"ok"

        # Re-registering from the same address returns the membership at once.
        assert client.register("ffn", 1, "ffn-1:7000", FP, timeout_s=1) == membership
        with pytest.raises(ControlError, match="ffn instance 1 is already registered from"):
            client.register("ffn", 1, "elsewhere:7000", FP, timeout_s=1)
        with pytest.raises(ControlError, match="out of range"):
            client.register("attention", 2, "a2:7000", FP, timeout_s=1)
        assert client.heartbeat("attention", 1) == (True, 1)


def test_before_the_cluster_forms_a_wrong_model_is_refused_and_a_wait_times_out(tmp_path):
    with controller(tmp_path) as (_, address), ControlClient(address) as client:
        with pytest.raises(ControlError) as refusal:
            client.register("ffn", 1, "ffn-1:7000", "deadbeefdeadbeef", timeout_s=5)
        message = str(refusal.value)
        assert "deadbeefdeadbeef" in message and FP in message
        assert "same checkpoint" in message

        start = time.monotonic()
        with pytest.raises(TimeoutError, match="missing attention instance 1, ffn instance 0"):
            client.register("attention", 0, "a0:7000", FP, timeout_s=0.5)
        assert time.monotonic() - start < 5


def test_an_opened_step_wakes_every_member_waiting_for_it(tmp_path):
    with controller(tmp_path) as (_, address), ControlClient(address) as client:
        epoch = register_everyone(client)[0].epoch
        # FFN instances and idle attention instances wait for step 0 to be opened.
        join = in_threads(lambda: client.await_step(epoch, 0, timeout_s=20), [()] * 3)
        time.sleep(0.2)
        client.open_step(epoch, 0, 1)  # attention instance 1 has work
        results, errors = join()
        assert errors == [None] * 3 and results == [True] * 3
        client.open_step(epoch, 0, 0)  # the other one, woken for the same step: harmless
        assert client.await_step(epoch, 0, timeout_s=0.1)  # an opened step stays open
        start = time.monotonic()
        assert not client.await_step(epoch, 5, timeout_s=0.3)  # not opened: the wait runs out
        assert time.monotonic() - start >= 0.25
        with pytest.raises(EpochChanged, match="epoch 2 but the cluster is at epoch 1"):
            client.open_step(2, 1, 1)
        with pytest.raises(ControlError, match="attention instance 7 is not a member"):
            client.open_step(epoch, 1, 7)


def test_shutdown_wakes_waiters_health_serves_and_sigterm_exits_cleanly(tmp_path):
    with controller(tmp_path) as (process, address), ControlClient(address) as client:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "afd.v1.Controller"):
                response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING

        # Three members wait for the cluster to form (the fourth never comes) ...
        join_registrations = in_threads(
            lambda role, index: client.register(role, index, f"{role}-{index}:1", FP, 60),
            SLOTS[:3],
        )
        # ... and a step is awaited before the cluster formed: refused, not waited for.
        with pytest.raises(ControlError, match="epoch 1 has not formed yet"):
            client.await_step(1, 0, timeout_s=60)
        time.sleep(0.3)
        assert client.heartbeat("attention", 0) == (True, 1)
        client.shutdown()
        _, errors = join_registrations(timeout_s=10)
        assert all(isinstance(err, ClusterShutdown) for err in errors), errors
        assert client.heartbeat("attention", 0) == (False, 1)

        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0


def test_wire_round_trips_a_membership():
    membership = Membership(
        epoch=3,
        world_size=2,
        store_host="controller",
        store_port=29500,
        config=ClusterConfig(4, 64, fp8_dispatch=True, ffn_layout="replicated"),
        members=(Member("attention", 0, 0, "a:1"), Member("ffn", 0, 1, "f:1")),
    )
    assert wire.membership_from_proto(wire.membership_to_proto(membership)) == membership
    with pytest.raises(ValueError, match="role"):
        wire.role_to_proto("expert")


def test_a_controller_with_a_secret_refuses_strangers_and_answers_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_CLUSTER_SECRET", "s3cret-of-this-cluster")  # the process inherits it
    with controller(tmp_path) as (_, address):
        for secret in (None, "a guess"):
            with ControlClient(address, secret=secret) as stranger:
                with pytest.raises(ControlError, match="this cluster requires its secret"):
                    stranger.register("attention", 0, "evil:1", FP, 5)
                with pytest.raises(ControlError, match="requires its secret"):
                    stranger.await_step(1, 0, 0.1)
        with grpc.insecure_channel(address) as channel:  # probes carry no secret
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with ControlClient(address, secret="s3cret-of-this-cluster") as member:
            assert register_everyone(member)[0].epoch == 1


def test_the_cluster_re_forms_over_grpc_and_refuses_stale_and_malformed_messages(tmp_path):
    with controller(tmp_path) as (_, address), ControlClient(address) as client:
        register_everyone(client)
        # Attention instance 0's data-plane group broke: it registers again with last_epoch.
        rejoin = in_threads(
            lambda role, index: client.register(
                role, index, f"{role}-{index}:7000", FP, 30, last_epoch=1
            ),
            SLOTS,
        )
        results, errors = rejoin()
        assert errors == [None] * len(SLOTS)
        assert {m.epoch for m in results} == {2}
        assert client.heartbeat("ffn", 0) == (True, 2)
        # A message of the epoch that ended is refused with OUT_OF_RANGE: register again.
        with pytest.raises(
            EpochChanged, match="for epoch 1 but the cluster is at epoch 2: register again"
        ):
            client.open_step(1, 0, 0)
        with pytest.raises(EpochChanged, match="epoch 1 but the cluster is at epoch 2"):
            client.await_step(1, 0, 0.1)
        client.open_step(2, 0, 0)  # the current epoch's are served
        # Malformed messages get INVALID_ARGUMENT / FAILED_PRECONDITION with the reason.
        stub = wire.controller_stub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as bad:
            stub.Register(pb.RegisterRequest(index=0, address="x:1", fingerprint=FP), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "names no known role" in bad.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.OpenStep(pb.OpenStepRequest(epoch=2, step=1, attention_index=9), timeout=5)
        assert bad.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "attention instance 9 is not a member of epoch 2" in bad.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.Heartbeat(pb.HeartbeatRequest(role=pb.ROLE_FFN, index=7), timeout=5)
        assert bad.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "ffn index 7 is out of range" in bad.value.details()
        # A drained member leaves: the others form epoch 3 without it.
        client.leave("attention", 1)
        others = [("attention", 0), ("ffn", 0), ("ffn", 1)]
        rejoin = in_threads(
            lambda role, index: client.register(
                role, index, f"{role}-{index}:7000", FP, 30, last_epoch=2
            ),
            others,
        )
        results, errors = rejoin()
        assert errors == [None] * 3
        assert results[0].epoch == 3 and results[0].attention_indices == [0]
