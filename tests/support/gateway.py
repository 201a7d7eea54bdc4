"""A gateway process in front of a test cluster, and raw HTTP calls to it (what the
`openai` client would refuse to send)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

from services.common import cluster_secret
from tests.support.cluster import CLUSTER_SECRET, ROOT

API_KEY = "sk-test-key"
PROMPT = "Hello! Who are you?"
MESSAGES = [{"role": "user", "content": PROMPT}]
# The chat template opens a thinking section by default, and the reasoning parser returns
# everything before </think> as reasoning_content: tests about the answer turn thinking off.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@dataclass
class Gateway:
    process: subprocess.Popen
    url: str
    lines: list[str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_gateway(*args: str, timeout_s: float = 60.0) -> Gateway:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", cluster_secret.ENV: CLUSTER_SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--port", "0", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            match = re.match(r"gateway serving on (\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s) or not found:
        process.kill()
        raise RuntimeError("gateway did not start:\n" + "".join(lines[-40:]))
    return Gateway(process, found[0], lines)


def raw_post(gateway: Gateway, path: str, body: bytes, headers: dict | None = None):
    """Status, headers and the JSON body of a POST sent as given."""
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, response.headers, json.loads(data or b"null")
    finally:
        conn.close()


def raw_get(gateway: Gateway, path: str, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()
