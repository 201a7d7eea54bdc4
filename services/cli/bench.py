"""`afd bench --url URL --model NAME`: measure an OpenAI-compatible server under load.

Streams every request, so it sees each token: TTFT, TPOT, ITL and end-to-end latency at
p50/p90/p99, throughput, and goodput under the TTFT and TPOT SLAs. `--sweep` runs several
loads and draws the throughput-versus-TPOT frontier; `afd bench plot A.json B.json` draws
several results on one plot. Results go to OUTPUT_DIR as JSON and Markdown (and PNG).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import time
from pathlib import Path

from services.bench import report as reports
from services.bench.client import ENDPOINTS, Target
from services.bench.load import Bounds, Load
from services.bench.plot import TPOT_STATS, plot_frontier, require_matplotlib
from services.bench.runner import parse_sweep, run_benchmark
from services.bench.stats import SLA
from services.bench.workload import FilePrompts, Lengths, SyntheticPrompts, load_tokenizer


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (afd bench plot: compare results)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--url", required=True, help="http://HOST:PORT of the server")
    server.add_argument("--model", required=True, help="the model name the server serves")
    server.add_argument("--endpoint", choices=ENDPOINTS, default="completions")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    load = parser.add_argument_group("load (default: --concurrency 1)")
    load.add_argument("--concurrency", type=int, help="requests in flight (a cap with --rate)")
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    load.add_argument("--sweep", metavar="KEY=V1,V2", help="concurrency=1,4,16 or rate=1,2,4")
    load.add_argument("--num-requests", type=int, help="measured requests per load (def. 100)")
    load.add_argument("--duration", type=float, metavar="S", help="stop sending after S seconds")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    data = parser.add_argument_group("workload")
    data.add_argument("--input-len", default="128", help="prompt tokens: N or LOW:HIGH")
    data.add_argument("--output-len", default="128", help="max_tokens: N or LOW:HIGH")
    data.add_argument("--dataset", metavar="FILE.jsonl", help='lines of {"prompt": ...}')
    data.add_argument("--tokenizer", metavar="DIR", help="default: Step-3's (DeepSeek-V3's)")
    data.add_argument("--no-ignore-eos", action="store_true", help="let EOS end outputs early")
    data.add_argument("--temperature", type=float, default=0.0)
    data.add_argument("--seed", type=int, default=0)
    result = parser.add_argument_group("results")
    result.add_argument("--sla-ttft-ms", type=float, default=2000.0)
    result.add_argument("--sla-tpot-ms", type=float, default=50.0)
    result.add_argument("--num-gpus", type=int, help="report tokens/s per GPU too")
    result.add_argument("--label", help="the configuration's name in tables and plots")
    result.add_argument("--output-dir", type=Path, default=Path("."))
    result.add_argument("--request-timeout", type=float, default=600.0, metavar="S")
    result.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULT.json")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench-frontier.png"))
    parser.add_argument("--tpot", choices=TPOT_STATS, default="p50", help="the x axis")
    parser.set_defaults(run=run_plot)


def plot_main(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="afd bench plot", description="Draw several bench results on one frontier plot."
    )
    add_plot_arguments(parser)
    return parser.parse_args(argv)


def run_plot(args: argparse.Namespace) -> int:
    data = [reports.read(path) for path in args.results]
    print(f"wrote {plot_frontier(data, args.output, args.tpot)}")
    return 0


def loads(args: argparse.Namespace) -> list[Load]:
    if args.sweep:
        if args.rate is not None:
            raise ValueError("--sweep and --rate: give the rates in the sweep (rate=1,2,4)")
        if args.sweep.startswith("concurrency") and args.concurrency is not None:
            raise ValueError("--sweep concurrency=... and --concurrency: give one")
        return parse_sweep(args.sweep, cap=args.concurrency)
    if args.rate is None and args.concurrency is None:
        return [Load(concurrency=1)]
    return [Load(concurrency=args.concurrency, rate=args.rate)]


def bounds(args: argparse.Namespace) -> Bounds:
    num = args.num_requests
    if num is None and args.duration is None:
        num = 100
    return Bounds(num, args.duration, args.warmup)


def workload(args: argparse.Namespace):
    output_lens = Lengths.parse(args.output_len, "--output-len")
    folder = args.tokenizer or (
        args.model if Path(args.model, "tokenizer.json").is_file() else None
    )
    tokenizer = load_tokenizer(folder)
    if args.dataset:
        source = FilePrompts(args.dataset, tokenizer, output_lens, args.seed)
        return source, f"prompts from {args.dataset}, output {output_lens} tokens if not given"
    input_lens = Lengths.parse(args.input_len, "--input-len")
    source = SyntheticPrompts(tokenizer, input_lens, output_lens, args.seed)
    return source, f"synthetic, input {input_lens} tokens, output {output_lens} tokens"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "bench"


def run(args: argparse.Namespace) -> int:
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ValueError(f"--num-gpus must be at least 1, got {args.num_gpus}")
    if args.sweep:
        require_matplotlib()  # before the sweep, not after an hour of it
    target = Target(
        args.url, args.model, args.endpoint, args.api_key, not args.no_ignore_eos, args.temperature
    )
    run_loads, run_bounds = loads(args), bounds(args)
    sla = SLA(args.sla_ttft_ms, args.sla_tpot_ms)
    source, described = workload(args)
    points = asyncio.run(
        run_benchmark(
            target,
            iter(source),
            run_loads,
            run_bounds,
            sla,
            num_gpus=args.num_gpus,
            seed=args.seed,
            request_timeout_s=args.request_timeout,
            progress=not args.no_progress,
        )
    )
    label = args.label or args.model
    report = reports.Report(label, config(args, described, run_bounds))
    for load, summary, run_result in points:
        report.add({"concurrency": load.concurrency, "rate": load.rate}, summary, run_result)
    stem = f"bench-{slug(label)}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, md_path = report.write(args.output_dir, stem)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if args.sweep:
        png = plot_frontier([report.to_json()], args.output_dir / f"{stem}.png")
        print(f"wrote {png}")
    # A load where nothing succeeded is a failed benchmark, whatever was written.
    return 1 if any(summary.completed == 0 for _, summary, _ in points) else 0


def config(args: argparse.Namespace, described: str, run_bounds: Bounds) -> dict:
    return {
        "url": args.url,
        "model": args.model,
        "endpoint": args.endpoint,
        "workload": described,
        "ignore_eos": not args.no_ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "num_requests": run_bounds.num_requests,
        "duration_s": run_bounds.duration_s,
        "warmup": run_bounds.warmup,
        "num_gpus": args.num_gpus,
        "command": "afd " + shlex.join(args.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
