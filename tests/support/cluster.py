"""Running a real local AFD cluster (`afd serve`) from a test, and talking to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common import cluster_secret
from services.common.sampling_params import SamplingParams
from services.common.wire.attention_client import AttentionClient

ROOT = Path(__file__).resolve().parents[2]


# The cluster secret of every cluster the tests start; their clients send it.
CLUSTER_SECRET = "the-tests-cluster-secret"


def afd(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """`afd ARGS` as a child process, one thread per child so several start in parallel;
    `env`: variables to set besides this one's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env[cluster_secret.ENV] = CLUSTER_SECRET
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, text=True, **kwargs
    )


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    prompt_logprobs: list[float] = field(default_factory=list)  # when asked for


class Cluster:
    """`afd serve` started with `args`; `addresses` of its attention instances once ready,
    and `gateway_url` (http://host:port) when started with `gateway=True`."""

    def __init__(self, *args: str, gateway: bool = False, ready_timeout_s: float = 180.0) -> None:
        extra = ["--port", "0"] if gateway else ["--no-gateway"]
        self.process = afd("serve", *args, *extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.addresses: list[str] = []
        self.gateway_url: str | None = None
        self._wants_gateway = gateway
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(ready_timeout_s) or not self.addresses:
            self.stop()
            raise RuntimeError("cluster did not start:\n" + "".join(self.lines[-40:]))

    def _read(self, ready: threading.Event) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("cluster ready: attention instances at "):
                self.addresses = line.split(" at ", 1)[1].split()
                if not self._wants_gateway:
                    ready.set()
            if line.startswith("[gateway] gateway serving on "):
                self.gateway_url = line.split(" on ", 1)[1].strip()
                ready.set()
        ready.set()  # the process ended

    def generate(self, index: int, request_id: str, prompt: list[int], params: SamplingParams):
        with grpc.insecure_channel(self.addresses[index]) as channel:
            ids, logprobs, reason, scored = [], [], None, []
            client = AttentionClient(channel, CLUSTER_SECRET)
            for output in client.generate(request_id, prompt, params):
                ids += output.new_token_ids
                logprobs += [entry.logprob for entry in output.new_logprobs]
                scored += [entry.logprob for entry in output.prompt_logprobs]
                reason = output.finish_reason
            return Completion(ids, logprobs, reason, scored)

    def generate_all(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Every prompt at once, spread round-robin over the attention instances."""
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [
                pool.submit(self.generate, i % len(self.addresses), f"req-{i}", p, params)
                for i, p in enumerate(prompts)
            ]
            return [f.result(timeout=300) for f in futures]

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes whose arguments contain `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def wait_until_gone(text: str, timeout_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
