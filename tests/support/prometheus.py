"""A real Prometheus server on 127.0.0.1 for the tests: scrapes what a file_sd target list
names, answers PromQL over its HTTP API. `make test` installs it (Debian's `prometheus`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

SCRAPE_INTERVAL = "1s"
CONFIG = """\
global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
rule_files: [{rules}]
scrape_configs:
  - job_name: afd
    file_sd_configs:
      - files: ["{targets}"]
        refresh_interval: {interval}
"""


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise RuntimeError("no prometheus binary: `make prometheus` installs Debian's package")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, targets: Path, rules: tuple[Path, ...] = ()) -> None:
        config = workdir / "prometheus.yml"
        rule_list = ", ".join(f'"{r}"' for r in rules)
        config.write_text(CONFIG.format(interval=SCRAPE_INTERVAL, targets=targets, rules=rule_list))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(60.0)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus was not ready within {timeout_s:g} s")

    def get(self, path: str) -> dict:
        """A GET of the HTTP API, e.g. /api/v1/rules."""
        return httpx.get(f"{self.url}{path}", timeout=10.0).json()

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` (a list of {metric, value}); raises on a bad query."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = answer.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None when it has no series."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} has {len(result)} series"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate, timeout_s: float = 30.0) -> float | None:
        """Poll `expr` until predicate(value) holds (scrapes come every second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(expr)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
