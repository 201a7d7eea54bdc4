"""Where the colocated engine's decode step spends its time, on the host and on the GPU, for
comparing two source trees (`PYTHONPATH=<tree>`, as `gpu_runner_step.py`, whose model and
engine setup this reuses: only API that aa5a591 and the current main share).

For each B, once every request decodes and the step's graph is captured, after --warmup
steps:
- timed steps: each `engine.step()` on the host (perf_counter), split at the graph's replay:
  `before replay` (the scheduler, the runner up to the launch: the GPU is idle all that
  time), the replay's launch, `after replay` (sampling, which waits for the GPU, and the
  engine's update); the named callables on the way (`schedule`, `prepare_inputs`,
  `split_micro_batches`, the FFN executor's `begin`/`end`, ...) are wrapped in place and
  timed where the tree has them. The replay's GPU time comes from CUDA events around it,
  which wait for nothing;
- sync steps: the same with a synchronize right after the replay, so `after replay` is the
  host's own work with no GPU left to wait for (what the timed steps partly hide);
- profiled steps (torch.profiler, CPU and CUDA): the top host ops and the top kernels, per
  step; then one eager run of the captured function (the forward `DecodeGraphs` captured, on the
  graph's own input buffers): the kernels one step's graph holds, in order, with a hash of
  their names to compare the trees' graphs at a glance.
The generated tokens' hash says whether both trees computed the same thing (same routing).

Prints Markdown, about 4,000 characters per B; --out DIR also writes the full kernel list,
the full op tables and a Chrome trace of the profiled steps there. --smoke: the tiny preset
on the CPU (no graphs, no CUDA), only to check that the script runs against a tree.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from gpu_runner_step import bench_model, decoding_engine, pct, sync
from torch.profiler import ProfilerActivity, profile, record_function

import services
import services.attention.engine as engine_module
import services.attention.model_runner as runner_module

CUDA = torch.cuda.is_available()
LABEL = "## "  # prefix of the profiler ranges this script opens


class StepClock:
    """Host times of one step's named parts, kept per step. Callables are wrapped in place
    (instance or module attributes, CUDAGraph.replay on its class); a part a tree lacks is
    simply not there."""

    def __init__(self) -> None:
        self.part: dict[str, float] = {}  # label -> seconds in this step
        self.first: dict[str, float] = {}  # label -> perf_counter at its first call
        self.last_end: dict[str, float] = {}  # label -> perf_counter at its last return
        self.steps: list[dict[str, float]] = []
        self.replay_gpu_ms: list[float] = []
        self.sync_after_replay = False
        self.labelled = False  # open a profiler range per part (while profiling)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._wrapped: list[tuple[object, str, object]] = []  # (owner, attr, its own value)

    def wrap(self, owner, attr: str, label: str, gpu_events: bool = False) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        self._wrapped.append((owner, attr, vars(owner).get(attr)))

        def timed(*args, **kwargs):
            marks = self._event_pair() if gpu_events and CUDA else None
            if marks is not None:
                marks[0].record()
            start = time.perf_counter()
            self.first.setdefault(label, start)
            with record_function(LABEL + label) if self.labelled else nullcontext():
                result = fn(*args, **kwargs)
            if marks is not None:
                marks[1].record()
                self._events.append(marks)
            end = time.perf_counter()
            self.part[label] = self.part.get(label, 0.0) + end - start
            if gpu_events and self.sync_after_replay:
                sync()
                end = time.perf_counter()
            self.last_end[label] = end
            return result

        setattr(owner, attr, timed)

    def unwrap(self) -> None:
        """Put back every wrapped callable (the module and class ones outlive the engine)."""
        for owner, attr, own in reversed(self._wrapped):
            if own is None:
                delattr(owner, attr)  # an instance's bound method: its class's again
            else:
                setattr(owner, attr, own)
        self._wrapped = []

    def step(self, engine) -> list:
        """One engine step, its parts recorded (the events read at the next step's end)."""
        self.part, self.first, self.last_end = {}, {}, {}
        start = time.perf_counter()
        outs = engine.step()
        end = time.perf_counter()
        part = dict(self.part, step=end - start)
        if "replay" in self.first:
            part["before replay"] = self.first["replay"] - start
            part["after replay"] = end - self.last_end["replay"]
        self.steps.append(part)
        for begin, finish in self._events:  # the step's sampling read-back waited for them
            self.replay_gpu_ms.append(begin.elapsed_time(finish))
        self._spare += self._events
        self._events = []
        return outs

    def _event_pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """Events made once and reused: making them is host work the step does not do."""
        if not self._spare:
            self._spare.append(tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)))
        return self._spare.pop()

    def take(self) -> tuple[list[dict[str, float]], list[float]]:
        steps, gpu = self.steps, self.replay_gpu_ms
        self.steps, self.replay_gpu_ms = [], []
        return steps, gpu


def instrument(engine) -> StepClock:
    clock = StepClock()
    runner = engine.runner
    clock.wrap(engine.scheduler, "schedule", "schedule")
    clock.wrap(runner, "execute", "runner.execute")
    clock.wrap(runner_module, "split_micro_batches", "  split_micro_batches")
    clock.wrap(runner_module, "prepare_inputs", "  prepare_inputs")
    ffn = getattr(runner, "ffn", None)
    if ffn is not None:
        clock.wrap(ffn, "begin", "  ffn.begin")
        clock.wrap(ffn, "end", "  ffn.end")
    if runner.graphs is not None:
        clock.wrap(runner.graphs, "run", "  graphs.run")
        clock.wrap(runner.graphs, "_fill", "    graphs._fill")  # before static_inputs.py
        clock.wrap(getattr(runner.graphs, "inputs", None), "load", "    graphs._fill")
    clock.wrap(torch.cuda.CUDAGraph, "replay", "replay", gpu_events=True)
    clock.wrap(engine_module, "sample", "sample")
    clock.wrap(engine, "_update", "update")
    return clock


PARTS = ("before replay", "after replay")
ORDER = [
    "step",
    "before replay",
    "replay",
    "after replay",
    "schedule",
    "runner.execute",
    "  split_micro_batches",
    "  ffn.begin",
    "  prepare_inputs",
    "  graphs.run",
    "    graphs._fill",
    "  ffn.end",
    "sample",
    "update",
]


def phase_table(steps: list[dict[str, float]], gpu_ms: list[float], title: str) -> str:
    rows = [
        f"{title} ({len(steps)} steps; us)",
        "",
        "| part | median | p10 | p90 | mean |",
        "|---|---|---|---|---|",
    ]
    labels = [k for k in ORDER if any(k in s for s in steps)]
    labels += sorted({k for s in steps for k in s} - set(labels))
    for label in labels:
        us = [s[label] * 1e6 for s in steps if label in s]
        depth = (len(label) - len(label.lstrip())) // 2
        rows.append(
            f"| {'. ' * depth}{label.strip()} | "
            f"{statistics.median(us):.0f} | {pct(us, 0.1):.0f} | {pct(us, 0.9):.0f} | "
            f"{statistics.fmean(us):.0f} |"
        )
    if gpu_ms:
        us = [t * 1e3 for t in gpu_ms]
        rows.append(
            f"| replay on the GPU (events) | {statistics.median(us):.0f} | "
            f"{pct(us, 0.1):.0f} | {pct(us, 0.9):.0f} | {statistics.fmean(us):.0f} |"
        )
    return "\n".join(rows)


def device_time(avg) -> float:
    return getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0)


def is_cuda(avg) -> bool:
    return avg.device_type == torch.autograd.DeviceType.CUDA


def short(name: str, width: int = 58) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def profile_steps(
    engine, clock: StepClock, num: int, out: Path | None, label: str
) -> tuple[str, float]:
    """The profiled steps' top host ops and kernels; the kernels and copies a step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    clock.labelled = True
    with profile(activities=activities) as prof:
        for _ in range(num):
            clock.step(engine)
        sync()
    clock.labelled = False
    clock.take()
    avgs = prof.key_averages()
    host = sorted(
        (a for a in avgs if not is_cuda(a) and not a.key.startswith(LABEL)),
        key=lambda a: -a.self_cpu_time_total,
    )
    parts = sorted(
        (a for a in avgs if not is_cuda(a) and a.key.startswith(LABEL)),
        key=lambda a: -a.cpu_time_total,
    )
    kernels = sorted(
        (a for a in avgs if is_cuda(a) and not a.key.startswith(LABEL)),
        key=lambda a: -device_time(a),
    )
    lines = [
        f"Profiled steps ({num}; per step)",
        "",
        "| host op (self CPU) | calls | us |",
        "|---|---|---|",
    ]
    for a in host[:10]:
        lines.append(f"| {short(a.key)} | {a.count / num:g} | {a.self_cpu_time_total / num:.0f} |")
    lines.append("| **parts (incl. children, under the profiler)** | | |")
    for a in parts[:8]:
        lines.append(
            f"| {short(a.key[len(LABEL) :].strip())} | {a.count / num:g} | "
            f"{a.cpu_time_total / num:.0f} |"
        )
    if kernels:
        total_n = sum(a.count for a in kernels) / num
        total_us = sum(device_time(a) for a in kernels) / num
        lines += [
            "",
            f"CUDA kernels and copies: {total_n:g} a step, {total_us:.0f} us a step",
            "",
            "| kernel | count | us |",
            "|---|---|---|",
        ]
        for a in kernels[:12]:
            lines.append(f"| {short(a.key)} | {a.count / num:g} | {device_time(a) / num:.0f} |")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"ops_{label}.txt").write_text(
            avgs.table(sort_by="self_cpu_time_total", row_limit=200, max_name_column_width=90)
        )
        prof.export_chrome_trace(str(out / f"trace_{label}.json"))
    return "\n".join(lines), sum(a.count for a in kernels) / num


@torch.inference_mode()
def eager_graph_step(engine, out: Path | None, label: str, table: bool) -> str:
    """One eager run of what the last captured graph holds, on its own input buffers (it
    writes the K/V the last replay wrote, unchanged). `table`: its top kernels too (where
    the profiler saw none inside the replays)."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.graphs:
        return "Eager step of the graph: no graph captured (CPU, or graphs off)."
    key = list(graphs.graphs)[-1]
    batch, blocks = key
    if hasattr(graphs, "_forward"):  # before static_inputs.py
        forward = lambda: graphs._forward(*key)  # noqa: E731
    else:
        forward = lambda: graphs.forward(*graphs.inputs.step_inputs(key))  # noqa: E731
    sync()
    start = time.perf_counter()
    forward()
    launch = time.perf_counter() - start
    sync()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        sync()
    kernels = sorted(
        (e for e in prof.events() if is_cuda(e) and not e.name.startswith(LABEL)),
        key=lambda e: e.time_range.start,
    )
    names = [e.name for e in kernels]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    ordered = hashlib.sha1("\n".join(names).encode()).hexdigest()[:10]
    as_set = hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:10]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"kernels_{label}.txt").write_text(
            "\n".join(f"{e.time_range.elapsed_us():8.1f} us  {e.name}" for e in kernels) + "\n"
        )
    summary = (
        f"Eager step of the graph (batch {batch}, {blocks} blocks): {len(kernels)} kernels "
        f"and copies, {busy:.0f} us of kernel time; host launch {launch * 1e3:.2f} ms, "
        f"wall {wall * 1e3:.2f} ms; kernel names hash in order {ordered}, as a set {as_set}"
    )
    if not table or not kernels:
        return summary
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    rows = [f"| {short(n)} | {len(us)} | {sum(us):.0f} |" for n, us in top]
    return "\n".join([summary, "", "| kernel (eager) | count | us |", "|---|---|---|", *rows])


def gpu_clocks() -> str:
    if not CUDA or shutil.which("nvidia-smi") is None:
        return "n/a"
    query = "clocks.sm,clocks.mem,power.draw,temperature.gpu"
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else "n/a"


def token_hash(outs_per_step: list[list]) -> str:
    text = ";".join(",".join(str(list(o.new_token_ids)) for o in outs) for outs in outs_per_step)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_batch(model, batch: int, args: argparse.Namespace) -> None:
    total = 1 + args.warmup + args.steps + args.sync_steps + args.profile_steps
    engine, prefill_s = decoding_engine(model, batch, args.context, total, not args.eager)
    outs = engine.step()  # the first decode-only step: captures the graph
    assert len(outs) == batch, f"capture step served {len(outs)} of {batch} requests"
    clock = instrument(engine)
    for _ in range(args.warmup):
        clock.step(engine)
    clock.take()
    served = [clock.step(engine) for _ in range(args.steps)]
    assert all(len(o) == batch for o in served), "a timed step served too few requests"
    timed, gpu = clock.take()
    ms = [s["step"] * 1e3 for s in timed]
    gpu_med, before, after = (
        f"{statistics.median(xs):.3f}" if xs else "n/a"
        for xs in (gpu, *([s[k] * 1e3 for s in timed if k in s] for k in PARTS))
    )
    graphs = engine.runner.graphs
    num_graphs = len(graphs.graphs) if graphs is not None else 0
    print(
        f"\n## {args.label} B={batch}: step median {statistics.median(ms):.3f} ms "
        f"(p10 {pct(ms, 0.1):.3f}, p90 {pct(ms, 0.9):.3f}), replay GPU {gpu_med} ms, "
        f"prefill {prefill_s:.1f} s, graphs {num_graphs}, tokens {token_hash(served)}\n"
    )
    if not args.brief:
        print(phase_table(timed, gpu, "Timed steps"), "\n")
    clock.sync_after_replay = True
    for _ in range(args.sync_steps):
        clock.step(engine)
    clock.sync_after_replay = False
    synced, synced_gpu = clock.take()
    if synced and not args.brief:
        keep = ("step", "before replay", "replay", "after replay", "sample", "update")
        trimmed = [{k: v for k, v in s.items() if k in keep} for s in synced]
        print(phase_table(trimmed, synced_gpu, "Sync steps: synchronize after the replay"), "\n")
    out = Path(args.out) if args.out else None
    name = f"{args.label}_B{batch}"
    if args.profile_steps and not args.brief:
        try:
            text, num_kernels = profile_steps(engine, clock, args.profile_steps, out, name)
            print(text, "\n")
            print(eager_graph_step(engine, out, name, table=num_kernels < 10), "\n")
        except RuntimeError as err:  # keep the timings above, whatever the profiler does
            print(f"profiler failed: {err}\n")
    print(
        f"RESULT label={args.label} B={batch} step_median_ms={statistics.median(ms):.3f} "
        f"replay_gpu_median_ms={gpu_med} before_replay_ms={before} "
        f"after_replay_ms={after} tokens={token_hash(served)}",
        flush=True,
    )
    clock.unwrap()
    del engine
    if CUDA:
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[32])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--sync-steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--eager", action="store_true", help="cuda_graphs=False")
    parser.add_argument("--brief", action="store_true", help="the summary lines only")
    parser.add_argument("--out", help="a folder for the full kernel lists, tables and traces")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg, model, device = bench_model(args.smoke, args.layers)
    print(
        f"# {args.label}: services from {services.__path__[0]}; {device}; torch "
        f"{torch.__version__}; {cfg.num_hidden_layers} layers (MoE {list(cfg.moe_layers)}), "
        f"context {args.context}; graphs {not args.eager}; clocks (SM, mem, W, C) "
        f"{gpu_clocks()}",
        flush=True,
    )
    for batch in args.batches:
        run_batch(model, batch, args)
    print(f"# {args.label}: clocks after {gpu_clocks()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
