"""`afd serve`'s supervision, with fake processes and a fake clock: what dies is restarted
on the port it had, quickly-dying processes back off, and one that cannot start stops it."""

from __future__ import annotations

import pytest

from services.cli.local_cluster import Child, pin_port
from services.cli.supervisor import MAX_QUICK_DEATHS, GiveUp, Supervisor


class FakeProcess:
    def __init__(self, returncode=None):
        self.returncode = returncode

    def poll(self):
        return self.returncode


class FakeCluster:
    def __init__(self, clock):
        self.clock = clock
        self.children = [
            Child("controller", FakeProcess(), ["controller", "--port", "0"], stage=2),
            Child("ffn instance 1", FakeProcess(), ["ffn", "--index", "1"], stage=1),
        ]
        for child in self.children:
            child.started = clock()
        self.said: list[str] = []
        self.restarted: list[str] = []

    def say(self, line):
        self.said.append(line)

    def restart(self, child):
        self.restarted.append(child.name)
        child.process = FakeProcess()
        child.started = self.clock()


def test_a_dead_process_is_restarted_at_once_after_a_long_life_and_backs_off_when_quick():
    now = [100.0]
    cluster = FakeCluster(lambda: now[0])
    supervisor = Supervisor(cluster, clock=lambda: now[0])
    supervisor.check()
    assert cluster.restarted == []  # all alive
    ffn = cluster.children[1]
    now[0] = 200.0  # it ran 100 s, then was killed
    ffn.process = FakeProcess(-9)
    supervisor.check()
    assert cluster.restarted == ["ffn instance 1"]
    assert cluster.said == ["ffn instance 1 exited with code -9; restarting it (restart 1)"]
    now[0] = 201.0  # died 1 s after its start: wait 1 s, then 2 s, ...
    ffn.process = FakeProcess(2)
    supervisor.check()
    assert cluster.restarted == ["ffn instance 1"]
    now[0] = 202.0
    supervisor.check()
    assert cluster.restarted == ["ffn instance 1"] * 2
    now[0] = 203.0
    ffn.process = FakeProcess(2)
    supervisor.check()
    now[0] = 204.5
    supervisor.check()
    assert len(cluster.restarted) == 2, "the second quick death waits 2 s"
    now[0] = 205.0
    supervisor.check()
    assert len(cluster.restarted) == 3


def test_a_process_that_cannot_start_stops_the_cluster_naming_it():
    now = [0.0]
    cluster = FakeCluster(lambda: now[0])
    supervisor = Supervisor(cluster, clock=lambda: now[0])
    ffn = cluster.children[1]
    with pytest.raises(
        GiveUp, match=f"ffn instance 1 exited with code 2, {MAX_QUICK_DEATHS} times"
    ):
        for _ in range(100):
            ffn.process = FakeProcess(2)
            now[0] += 0.5
            supervisor.check()
            now[0] += 20.0  # past any back-off, still within 30 s of the last start
            supervisor.check()


def test_a_restarted_process_keeps_the_port_it_had():
    args = ["controller", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    assert pin_port(args, "127.0.0.1:4567") == [
        "controller", "--host", "127.0.0.1", "--port", "4567", "--metrics-port", "0",
    ]  # fmt: skip
    assert pin_port(["gateway", "--port", "8000"], "http://127.0.0.1:8000") == [
        "gateway", "--port", "8000",
    ]  # fmt: skip
    assert pin_port(["gateway", "--port", "0"], "http://[::1]:8123") == [
        "gateway",
        "--port",
        "8123",
    ]
    # and the metrics port: a Prometheus targets file written at start stays true
    assert pin_port(args, "127.0.0.1:9400", "--metrics-port") == [
        "controller", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "9400",
    ]  # fmt: skip
