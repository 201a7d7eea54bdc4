"""What disaggregation costs on CPU, against the single-process engine, and what the control
plane costs per step. A script, not a test: it prints Markdown tables for docs/benchmarks.md.

    .venv/bin/python benchmarks/afd_cpu.py [--batches 1 8 32] [--output-tokens 64]

Decode: a random tiny checkpoint (`afd init-checkpoint --preset tiny`), B concurrent requests
of a fixed length (random 32-token prompts, 64 output tokens, ignore_eos), served by
- `local`: the single-process engine (`local_engine`), stepped in this process;
- `local gRPC`: the same engine behind the attention gRPC API, in its own process (this
  script's `serve-local` mode), so the API's own cost is visible apart from AFD's;
- `AFD K=1`, `AFD K=3`: `afd serve` with 1 attention and 1 FFN instance.
TPOT is the median over requests of (last token time - first token time) / (tokens - 1);
decode tokens/s is B / TPOT; end to end counts every token from the first submit to the last
token, prefill included. Each figure is the median of --repeats runs, the systems taking
turns on the same prompts (all servers stay up; an idle one costs under 0.1 core); every
process runs torch with --threads intra-op threads (1 by default).

Control plane: busy steps make no control-plane call (their sizes travel in the data plane's
step headers); only a step after an idle one is opened through the controller. Measured: a
real controller (`python -m services.controller`), an attention member and an FFN member
registered from two threads; per opening, the time from the attention member's open_step
(which `afd attention` sends asynchronously, never waiting for it) to the FFN member's
await_step returning, the wake-up latency an idle cluster pays once per busy period.

Data plane (cpu_data_plane.py): one layer's A2F message and F2A answer between two
processes through the production `Transport` on gloo.

Knows nothing of GPUs; every figure is float32 on whatever CPU runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from statistics import median

import grpc
import torch
from cpu_data_plane import bench_data_plane  # beside this script
from prometheus_client.parser import text_string_to_metric_families

from services.attention.api import ERROR_CODES, add_attention_service
from services.attention.builder import local_engine
from services.attention.driver import EngineDriver
from services.attention.engine import Engine, EngineConfig
from services.common import cluster_secret
from services.common.control_client import ControlClient
from services.common.grpc_server import GrpcServer
from services.common.model.build import load_model
from services.common.sampling_params import SamplingParams
from services.common.wire import attention as wire
from services.common.wire.attention_client import AttentionClient

# Every cluster this script starts shares one secret (the children inherit it); its
# clients send it.
SECRET = os.environ.setdefault(cluster_secret.ENV, cluster_secret.new_secret())

START_TIMEOUT_S = 120.0
PAPER_TPOT_S = 0.050  # Step-3's SLA: 50 ms per output token
PAPER_LAYER_STAGE_S = 272e-6  # its budget per layer and pipeline stage (16.6 ms / 61 layers)
SECTIONS = ("decode", "control", "data")


@dataclass(frozen=True)
class Result:
    system: str
    batch: int
    tpot_s: float  # median over requests
    decode_tokens_per_s: float  # batch / TPOT
    e2e_tokens_per_s: float  # all tokens / (last token - first submit)
    tpot_range_s: tuple[float, float] = (0.0, 0.0)  # fastest and slowest of the repeats


def typical(runs: list[Result]) -> Result:
    """The run with the median TPOT, carrying the spread of all of them."""
    ordered = sorted(runs, key=lambda r: r.tpot_s)
    spread = (ordered[0].tpot_s, ordered[-1].tpot_s)
    return replace(ordered[len(ordered) // 2], tpot_range_s=spread)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prompts(rng: random.Random, batch: int, length: int) -> list[list[int]]:
    """Random ids below the special tokens, fresh each call: no prefix-cache hits."""
    return [[rng.randrange(128000) for _ in range(length)] for _ in range(batch)]


def summarise(system: str, stamps: list[list[tuple[float, int]]], start: float) -> Result:
    """stamps[request]: (arrival time, tokens arrived) per response."""
    tpots = []
    for request in stamps:
        later = sum(n for _, n in request[1:])
        tpots.append((request[-1][0] - request[0][0]) / later)
    tokens = sum(n for request in stamps for _, n in request)
    end = max(request[-1][0] for request in stamps)
    tpot = median(tpots)
    return Result(system, len(stamps), tpot, len(stamps) / tpot, tokens / (end - start))


def run_local(engine: Engine, batch_prompts: list[list[int]], *, params: SamplingParams) -> Result:
    stamps: dict[str, list[tuple[float, int]]] = {}
    start = time.perf_counter()
    for i, prompt in enumerate(batch_prompts):
        engine.add_request(f"r{i}", prompt, params)
        stamps[f"r{i}"] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            stamps[out.request_id].append((now, len(out.new_token_ids)))
    return summarise("local", list(stamps.values()), start)


def run_client(
    system: str, client: AttentionClient, batch_prompts: list[list[int]], *, params: SamplingParams
) -> Result:
    """B concurrent streams, one thread each."""
    stamps: list[list[tuple[float, int]]] = [[] for _ in batch_prompts]
    errors: list[BaseException] = []
    tag = f"{time.monotonic_ns()}"

    def stream(i: int) -> None:
        try:
            for delta in client.generate(f"{tag}-{i}", batch_prompts[i], params, timeout_s=120):
                stamps[i].append((time.perf_counter(), len(delta.new_token_ids)))
        except BaseException as err:  # reported below, after every thread ended
            errors.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(batch_prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{system}: {len(errors)} stream(s) failed: {errors[0]}")
    return summarise(system, stamps, start)


class Child:
    """A process that prints a line matching `ready` (group 1: its address) once it serves."""

    def __init__(self, command: list[str], ready: str, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.address = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(re.compile(ready),), daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or not self.address:
            self.stop()
            raise RuntimeError(f"{command[:4]} did not start; see {log}")

    def _read(self, ready: re.Pattern) -> None:
        for line in self.process.stdout:  # drained to the end so the child never blocks
            match = ready.search(line)
            if match and not self.address:
                self.address = match.group(1)
                self._ready.set()
        self._ready.set()

    def cpu_seconds(self) -> float:
        """User + system CPU time of this process and its children (for `afd serve`)."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def afd(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def idle_cores(child: Child, seconds: float) -> float:
    """The server's CPU use (cores) over `seconds` with no request."""
    before = child.cpu_seconds()
    time.sleep(seconds)
    return (child.cpu_seconds() - before) / seconds


def bench_decode(args: argparse.Namespace, checkpoint: Path, logs: Path) -> list[str]:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    engine = local_engine(load_model(checkpoint, "float32", progress=False), EngineConfig())
    here = Path(__file__).resolve()
    commands = {
        "local gRPC": [sys.executable, str(here), "serve-local", str(checkpoint)],
        **{
            f"AFD K={k}": afd(
                "serve",
                "--model",
                str(checkpoint),
                "--attention-instances",
                "1",
                "--ffn-instances",
                "1",
                "--micro-batches",
                str(k),
                "--dtype",
                "float32",
                "--prometheus-targets",
                str(logs / f"targets-{k}.json"),
                "--no-gateway",  # this script speaks to the attention instance; all stay up
            )  # fmt: skip
            for k in args.micro_batches
        },
    }
    with ExitStack() as stack:
        children: dict[str, Child] = {}
        systems = {"local": partial(run_local, engine, params=params)}
        for system, command in commands.items():
            log = logs / f"{system.replace(' ', '_').replace('=', '')}.log"
            ready = (
                r"^serving on (\S+)" if system == "local gRPC" else r"attention instances at (\S+)"
            )
            children[system] = child = Child(command, ready, log)
            stack.callback(child.stop)
            channel = grpc.insecure_channel(child.address)
            stack.callback(channel.close)
            grpc.channel_ready_future(channel).result(START_TIMEOUT_S)
            client = AttentionClient(channel, SECRET)
            systems[system] = partial(run_client, system, client, params=params)
        for run in systems.values():
            run(prompts(rng, 1, args.prompt_tokens))  # warm-up
        # Every system in turn on the same prompts, repeat after repeat: a shared machine's
        # load drifts over minutes, and run back to back each system would meet another.
        runs: dict[tuple[str, int], list[Result]] = {}
        for batch in args.batches:
            for _ in range(args.repeats):
                batch_prompts = prompts(rng, batch, args.prompt_tokens)
                for system, run in systems.items():
                    runs.setdefault((system, batch), []).append(run(batch_prompts))
        idle = {system: idle_cores(child, args.idle_seconds) for system, child in children.items()}
        control = {
            system: control_wait(logs / f"targets-{system[-1]}.json")
            for system in children
            if system != "local gRPC"
        }
    results = {key: typical(group) for key, group in runs.items()}
    local = {batch: results["local", batch] for batch in args.batches}
    served = [results[system, batch] for system in commands for batch in args.batches]

    lines = [
        "| system | B | TPOT ms | TPOT range ms | decode tok/s | end-to-end tok/s | TPOT / local |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [*local.values(), *served]:
        ratio = r.tpot_s / local[r.batch].tpot_s
        lines.append(
            f"| {r.system} | {r.batch} | {r.tpot_s * 1e3:.1f} "
            f"| {r.tpot_range_s[0] * 1e3:.1f}-{r.tpot_range_s[1] * 1e3:.1f} "
            f"| {r.decode_tokens_per_s:.0f} "
            f"| {r.e2e_tokens_per_s:.0f} | {ratio:.2f} |"
        )
    lines += ["", "| server | idle CPU (cores busy with no request) |", "|---|---|"]
    lines += [f"| {system} | {cores:.2f} |" for system, cores in idle.items()]
    lines += [
        "",
        "| server | steps | control-plane wait per step: median | p99 (bucket bounds) | mean "
        "| mean / mean step |",
        "|---|---|---|---|---|---|",
    ]
    for system, (p50, p99, mean, steps, step_mean) in control.items():
        lines.append(
            f"| {system} | {steps} | <= {p50 * 1e6:g} us | <= {p99 * 1e6:g} us "
            f"| {mean * 1e6:.1f} us | {mean / step_mean:.4%} |"
        )
    return lines


def control_wait(targets_file: Path) -> tuple[float, float, float, int, float]:
    """From the attention instance's own metrics (`afd_attention_step_control_wait_seconds`,
    one observation per step): the median's and p99's bucket bounds, the mean, the number of
    steps and the mean step time (`afd_attention_step_seconds`)."""
    targets = json.loads(targets_file.read_text())
    address = next(t["targets"][0] for t in targets if t["labels"]["component"] == "attention")
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    wait = families["afd_attention_step_control_wait_seconds"].samples
    buckets = [(float(s.labels["le"]), s.value) for s in wait if s.name.endswith("_bucket")]
    count = next(s.value for s in wait if s.name.endswith("_count"))
    total = next(s.value for s in wait if s.name.endswith("_sum"))
    steps = families["afd_attention_step_seconds"].samples
    step_sum = next(s.value for s in steps if s.name.endswith("_sum"))
    step_count = next(s.value for s in steps if s.name.endswith("_count"))

    def bound(q: float) -> float:
        return next(le for le, cumulative in buckets if cumulative >= q * count)

    return bound(0.5), bound(0.99), total / count, int(count), step_sum / step_count


def bench_control_plane(args: argparse.Namespace, logs: Path) -> list[str]:
    command = [
        sys.executable, "-m", "services.controller", "--host", "127.0.0.1", "--port", "0",
        "--attention-instances", "1", "--ffn-instances", "1", "--fingerprint", "x",
    ]  # fmt: skip
    child = Child(command, r"controller listening on (\S+)", logs / "controller.log")
    try:
        with (
            ControlClient(child.address, secret=SECRET) as attention,
            ControlClient(child.address, secret=SECRET) as ffn,
        ):
            joined: dict[str, object] = {}
            threads = [
                threading.Thread(
                    target=lambda c=client, r=role: joined.update(
                        {r: c.register(r, 0, f"{r}-0:1", "x", 60)}
                    )
                )
                for client, role in ((attention, "attention"), (ffn, "ffn"))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
            epoch = joined["attention"].epoch
            steps = args.plan_steps

            times = []
            for step in range(steps):
                woken = threading.Event()
                waiter = threading.Thread(  # the FFN member, idle, as `afd ffn` waits
                    target=lambda s=step, w=woken: ffn.await_step(epoch, s, 30) and w.set()
                )
                waiter.start()
                time.sleep(0.002)  # the waiter is in its long-poll
                start = time.perf_counter()
                attention.open_step(epoch, step, 0)
                woken.wait(30)
                times.append(time.perf_counter() - start)
                waiter.join(30)
    finally:
        child.stop()
    times = times[len(times) // 10 :]  # the first tenth warms the channel up
    p50, p90, p99 = (percentile(times, q) for q in (0.5, 0.9, 0.99))
    return [
        "| idle-to-busy openings | median us | p90 us | p99 us | median / 50 ms TPOT | "
        "median / 272 us |",
        "|---|---|---|---|---|---|",
        f"| {len(times)} | {p50 * 1e6:.0f} | {p90 * 1e6:.0f} | {p99 * 1e6:.0f} "
        f"| {p50 / PAPER_TPOT_S:.2%} | {p50 / PAPER_LAYER_STAGE_S:.2f}x |",
    ]


def serve_local(checkpoint: str) -> int:
    """The single-process engine behind the attention API, until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    engine = local_engine(load_model(checkpoint, "float32", progress=False), EngineConfig())
    driver = EngineDriver(engine, idle_wait_s=0.01)
    driver.start()
    server = GrpcServer(ERROR_CODES)
    add_attention_service(server.server, driver)
    port = server.bind("127.0.0.1", 0)
    server.start()
    server.set_serving(True, ("", wire.SERVICE_NAME))
    print(f"serving on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(1.0)
    driver.stop()
    return 0


def main() -> int:
    if sys.argv[1:2] == ["serve-local"]:
        return serve_local(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; the median")
    parser.add_argument("--plan-steps", type=int, default=500)
    parser.add_argument("--pings", type=int, default=300, help="round trips per message size")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which parts to run (decode alone is what the TPOT targets need)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per process (every process, children included)",
    )
    args = parser.parse_args()
    # Each process would otherwise take one thread per core; on a small shared machine the
    # processes then spin against each other and every figure is noise.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="afd-bench-") as tmp:
        checkpoint, logs = Path(tmp) / "tiny", Path(tmp)
        subprocess.run(
            afd("init-checkpoint", str(checkpoint), "--preset", "tiny"),
            check=True,
            capture_output=True,
        )
        started, load_before = time.perf_counter(), f"{os.getloadavg()[0]:.2f}"
        sections = []
        if "decode" in args.sections:
            sections += ["## Decode", "", *bench_decode(args, checkpoint, logs), ""]
        if "control" in args.sections:
            sections += ["## Control plane", "", *bench_control_plane(args, logs), ""]
        if "data" in args.sections:
            data = bench_data_plane(args.batches, args.pings, PAPER_LAYER_STAGE_S)
            sections += ["## Data plane", "", *data, ""]
        print("\n".join(sections).rstrip())
        print(
            f"\n(total {time.perf_counter() - started:.0f} s; load average before "
            f"{load_before}, after {os.getloadavg()[0]:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
