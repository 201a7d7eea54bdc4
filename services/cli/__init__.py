"""The `afd` command: one subcommand per role or tool.

Each role (`afd attention`, `ffn`, `gateway`, `controller`) is its service's own entry point,
imported only when asked for, so a command loads only what it runs: the gateway and
`afd bench` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from services.cli import bench, ffn_pod, generate, init_checkpoint, plan, serve

TOOLS = (init_checkpoint, generate, serve, ffn_pod, bench, plan)
ROLES = {
    "attention": ("services.attention.__main__", "run one attention instance"),
    "ffn": ("services.ffn.__main__", "run one FFN instance"),
    "gateway": ("services.gateway.__main__", "run the OpenAI-compatible gateway"),
    "controller": ("services.controller.__main__", "run the control plane"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ROLES:
        role = importlib.import_module(ROLES[argv[0]][0])
        return reporting(argv[0], lambda: role.main(argv[1:]))
    args = parse(argv)
    return reporting(args.command, lambda: args.run(args))


def reporting(command: str, run: Callable[[], int]) -> int:
    """Run a command; user mistakes and cluster faults (bad config, missing tensor, a model
    that differs from the cluster's, a peer that stopped answering) end in one clear line."""
    try:
        return run()
    except (ValueError, OSError, RuntimeError) as err:
        print(f"afd {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def parse(argv: list[str]) -> argparse.Namespace:
    if argv[:2] == ["bench", "plot"]:
        args = bench.plot_main(argv[2:])
        args.command = "bench plot"
        return args
    parser = argparse.ArgumentParser(
        prog="afd", description="Attention-FFN disaggregated serving for Step-3-style models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in TOOLS:
        module.add_parser(commands)
    for role, (_, help_text) in ROLES.items():  # listed for --help; main() dispatches them
        commands.add_parser(role, help=f"{help_text} (see afd {role} --help)")
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # a launcher's flags for the processes it starts
    args.argv = argv  # recorded by tools whose results name the command that made them
    return args


if __name__ == "__main__":
    sys.exit(main())
