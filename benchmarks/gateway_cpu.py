"""CPU time per streamed token in the gateway and in the attention instance, for one or more
source trees side by side (`--trees OLD NEW`): what moving detokenisation from the attention
instance's engine thread to the gateway costs and saves.

For each tree, in turns (`--rounds` times, so that the machine's noise falls on both alike):
start `afd serve` from that tree (tiny model, 1 attention + 1 FFN instance, 1 micro-batch,
float32, gateway included), warm it, then stream B concurrent chat-free completions of T
tokens each (`ignore_eos`, greedy) through the gateway with the official `openai` client,
and read each role's CPU time (user + system, from /proc) before and after: CPU ms per
streamed token, per role. Linux only.

A script, not a test: `python benchmarks/gateway_cpu.py --trees /path/old /path/new`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
SECRET_ENV = "AFD_CLUSTER_SECRET"
PROMPT = "The quick brown fox jumps over the lazy dog " * 3
ROLES = ("gateway", "attention")
TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (scanning /proc for parents)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def role_of(pid: int) -> str | None:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    words = [a.decode() for a in args]
    return next((r for r in ROLES if r in words), None)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class Serve:
    """`afd serve` from `tree`, gateway on a free port."""

    def __init__(self, tree: Path, model: Path, secret: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), SECRET_ENV: secret, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--model", str(model),
             "--attention-instances", "1", "--ffn-instances", "1", "--micro-batches", "1",
             "--dtype", "float32", "--port", "0"],
            cwd=tree, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url: str | None = None
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(240) or self.url is None:
            self.stop()
            raise RuntimeError(f"afd serve from {tree} did not start")

    def _read(self, ready: threading.Event) -> None:
        for line in self.process.stdout:
            if line.startswith("[gateway] gateway serving on "):
                self.url = line.split(" on ", 1)[1].strip()
                ready.set()
        ready.set()

    def roles(self) -> dict[str, int]:
        return {r: pid for pid in descendants(self.process.pid) if (r := role_of(pid))}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def stream(client: openai.OpenAI, tokens: int) -> int:
    got = 0
    for chunk in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    ):  # fmt: skip
        if chunk.usage is None and chunk.choices:
            got += 1
    return tokens


def measure(tree: Path, model: Path, streams: int, tokens: int) -> dict[str, float]:
    """CPU ms per streamed token of each role, for one load on a fresh cluster."""
    serve = Serve(tree, model, os.environ[SECRET_ENV])
    try:
        client = openai.OpenAI(base_url=serve.url + "/v1", api_key="-", max_retries=0)
        stream(client, 8)  # warm-up
        pids = serve.roles()
        before = {r: cpu_seconds(p) for r, p in pids.items()}
        with ThreadPoolExecutor(streams) as pool:
            total = sum(pool.map(lambda _: stream(client, tokens), range(streams)))
        after = {r: cpu_seconds(p) for r, p in pids.items()}
        return {r: (after[r] - before[r]) * 1e3 / total for r in pids}
    finally:
        serve.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=Path, nargs="+", default=[ROOT])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault(SECRET_ENV, "gateway-cpu-benchmark-secret")
    model = Path(tempfile.mkdtemp()) / "tiny"
    subprocess.run(
        [sys.executable, "-m", "services.cli", "init-checkpoint", str(model), "--preset", "tiny"],
        cwd=args.trees[0], env={**os.environ, "PYTHONPATH": str(args.trees[0])}, check=True,
    )  # fmt: skip
    results: dict[Path, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            results[tree].append(measure(tree, model, args.streams, args.tokens))
            print(f"{tree}: {results[tree][-1]}", flush=True)
    print(f"\n{args.streams} streams x {args.tokens} tokens, median of {args.rounds} rounds\n")
    print("| tree | gateway CPU ms / token | attention CPU ms / token |")
    print("|---|---|---|")
    for tree, runs in results.items():
        cells = [statistics.median(run[r] for run in runs) for r in ROLES]
        print(f"| {tree} | {cells[0]:.3f} | {cells[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
