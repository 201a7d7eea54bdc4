"""`afd plan cost|deploy`: the Step-3 paper's decoding-cost model and an AFD deployment planner.

  afd plan cost --model step3 --context 8K [--hardware H800,H20,A800,910B | all] [--json]
  afd plan deploy --model step3 --context 4K --tpot-ms 50 --gpu H800 [--gpus-per-instance 8]
                  [--calibration FILE] [--json | --format helm-values | serve] [--plot FILE.png]

--model is a preset (step3, deepseek-v3, kimi-k2, qwen3-235b-a22b, qwen3-32b) or a checkpoint
folder with a config.json. An instance is --gpus-per-instance GPUs (the paper: 8, a node): an
attention instance of G GPUs is G data-parallel attention instances of one GPU, an FFN
instance of G GPUs one instance of G processes (`afd serve --gpus-per-ffn-instance G`, the
chart's ffn.gpusPerInstance). `--format helm-values` and `--format serve` print what deploys
the plan. docs/planner.md has the equations, their assumptions and how near the paper the
predictions land.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from services.common.cluster_config import LAYOUTS, REPLICATED, SPLIT
from services.planner import output
from services.planner.calibration import load_calibration
from services.planner.cost import cost_report
from services.planner.deploy import PAPER_MEMORY_FRACTION, Request, plan
from services.planner.hardware import PAPER_ACCELERATORS, find_accelerator, load_accelerators
from services.planner.models import PRESETS, load_model
from services.planner.stages import Cluster, Efficiency

KV_DTYPES = {"fp8": 1.0, "bf16": 2.0}
FORMATS = ("table", "json", "helm-values", "serve")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan",
        help="decoding cost per 1M tokens and the attention:FFN deployment for a TPOT SLA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="plan_command", required=True, metavar="cost|deploy")
    cost = kinds.add_parser("cost", help="per-token work and USD per 1M tokens per accelerator")
    _common(cost)
    cost.add_argument(
        "--hardware",
        default=",".join(PAPER_ACCELERATORS),
        help="accelerators to price, comma-separated, or 'all' (default: the paper's four)",
    )
    cost.add_argument("--json", action="store_true", help="print JSON")
    cost.add_argument("--plot", type=Path, metavar="FILE.png", help="AFD cost vs context")
    cost.set_defaults(run=run_cost)

    deploy = kinds.add_parser("deploy", help="choose the AFD deployment for a TPOT SLA")
    _common(deploy)
    deploy.add_argument("--tpot-ms", type=_positive_float, default=50.0, help="TPOT SLA")
    deploy.add_argument("--gpu", default="H800", help="accelerator (default H800)")
    deploy.add_argument(
        "--gpus-per-instance", type=_positive_int, default=1,
        help="GPUs per attention or FFN instance: 1 in this system, 8 in the paper",
    )  # fmt: skip
    deploy.add_argument("--network-gbps", type=_positive_float, help="per GPU (default: GPU's)")
    deploy.add_argument("--max-gpus", type=_positive_int, default=256)
    deploy.add_argument("--micro-batches", default="1,2,3,4", help="counts to try (paper: 3)")
    deploy.add_argument("--layout", choices=LAYOUTS, help="FFN layout (default: try both)")
    deploy.add_argument("--attention-instances", type=_positive_int, help="fix; else searched")
    deploy.add_argument("--ffn-instances", type=_positive_int, help="fix; else searched")
    deploy.add_argument(
        "--memory-fraction", type=_positive_float, default=PAPER_MEMORY_FRACTION,
        help="of each GPU's memory for weights and KV (default 0.8: the paper's batches)",
    )  # fmt: skip
    deploy.add_argument("--calibration", type=Path, metavar="FILE", help="measured stage times")
    deploy.add_argument("--format", choices=FORMATS, default="table")
    deploy.add_argument("--json", action="store_true", help="same as --format json")
    deploy.add_argument("--plot", type=Path, metavar="FILE.png", help="stage times vs budget")
    deploy.set_defaults(run=run_deploy)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="NAME_OR_DIR",
        help=f"a preset ({', '.join(PRESETS)}) or a checkpoint folder with config.json",
    )  # fmt: skip
    parser.add_argument(
        "--context", required=True, type=_context, help="tokens of context: 8192 or 8K"
    )
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="fp8", help="KV cache dtype")
    parser.add_argument("--hardware-file", type=Path, metavar="FILE", help="JSON overrides")


def run_cost(args: argparse.Namespace) -> int:
    accelerators = load_accelerators(args.hardware_file)
    if args.hardware.strip().lower() == "all":
        chosen = list(accelerators.values())
    else:
        names = [n for n in args.hardware.split(",") if n.strip()]
        chosen = [find_accelerator(n, accelerators) for n in names]
    model = load_model(args.model)
    kv_bytes = KV_DTYPES[args.kv_dtype]
    report = cost_report(model, args.context, chosen, kv_bytes)
    if args.plot:
        from services.planner.plot import plot_costs

        models = [model] + [load_model(p) for p in PRESETS if p != model.name]
        plot_costs(models, chosen, args.plot, kv_bytes)
    print(
        json.dumps(output.cost_dict(report), indent=2) if args.json else output.cost_table(report)
    )
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0


def run_deploy(args: argparse.Namespace) -> int:
    accelerators = load_accelerators(args.hardware_file)
    accelerator = find_accelerator(args.gpu, accelerators)
    efficiency = Efficiency()
    if args.calibration:
        calibration = load_calibration(args.calibration, accelerators)
        if calibration.gpu != accelerator.name:
            raise ValueError(
                f"{args.calibration} was measured on {calibration.gpu}, not {accelerator.name}: "
                f"plan with --gpu {calibration.gpu} or leave out --calibration"
            )
        efficiency = calibration.efficiency
    layouts = (args.layout,) if args.layout else LAYOUTS
    if args.gpus_per_instance > 1:
        # The processes of an FFN instance add up partial sums: split MLPs only.
        if args.layout == REPLICATED:
            raise ValueError(
                f"--gpus-per-instance {args.gpus_per_instance} takes --layout {SPLIT}: an FFN "
                "instance of several GPUs adds up its processes' partial sums"
            )
        layouts = (SPLIT,)
    cluster = Cluster(
        model=load_model(args.model),
        accelerator=accelerator,
        context=args.context,
        gpus_per_instance=args.gpus_per_instance,
        network_gbps=args.network_gbps,
        kv_bytes_per_element=KV_DTYPES[args.kv_dtype],
        efficiency=efficiency,
    )
    request = Request(
        cluster=cluster,
        tpot_s=args.tpot_ms / 1e3,
        max_gpus=args.max_gpus,
        micro_batch_counts=_counts(args.micro_batches),
        layouts=layouts,
        memory_fraction=args.memory_fraction,
        attention_instances=args.attention_instances,
        ffn_instances=args.ffn_instances,
    )
    chosen = plan(request)
    if args.plot:
        from services.planner.plot import plot_stages

        plot_stages(chosen, args.plot)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print(json.dumps(output.plan_dict(chosen), indent=2))
    elif fmt == "helm-values":
        print(output.helm_values(chosen), end="")
    elif fmt == "serve":
        model = args.model if Path(args.model).is_dir() else None
        print(output.serve_command(chosen, model), end="")
    else:
        print(output.plan_table(chosen))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0


def _context(text: str) -> int:
    """8192, 8K or 8k (K = 1024 tokens, as the paper's 4K/8K/32K)."""
    raw = text.strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = int(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count like 8192 or 8K") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"context must be positive, got {text!r}")
    return value


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--micro-batches must be counts like 3 or 1,2,3,4, got {text!r}"
        ) from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--micro-batches must be counts >= 1, got {text!r}")
    return counts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, got {text}")
    return value
