"""The `afd` command: one subcommand per role or tool."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from services.cli import bench, generate, init_checkpoint, serve
from services.common.control_client import ControlError
from services.common.transport import PeerFailure

TOOLS = (init_checkpoint, generate, serve, bench)


def _roles() -> dict[str, ModuleType]:
    # Imported here: each pulls in its whole service.
    import services.attention.__main__ as attention_main
    import services.ffn.__main__ as ffn_main
    import services.gateway.__main__ as gateway_main

    return {"attention": attention_main, "ffn": ffn_main, "gateway": gateway_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["controller"]:
        # The control plane keeps its own entry point and options.
        from services.controller.__main__ import main as controller_main

        return controller_main(argv[1:])
    args = parse(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, ControlError, PeerFailure, RuntimeError) as err:
        # User mistakes and cluster faults (bad config, missing tensor, a model that differs
        # from the cluster's, a peer that stopped answering) end in one clear line.
        print(f"afd {args.command}: error: {err}", file=sys.stderr)
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
    for role, module in _roles().items():
        module.add_arguments(
            commands.add_parser(role, help=f"run one {role} instance", description=module.__doc__)
        )
    commands.add_parser("controller", help="run the control plane (see afd controller --help)")
    args = parser.parse_args(argv)
    args.argv = argv  # recorded by tools whose results name the command that made them
    return args


if __name__ == "__main__":
    sys.exit(main())
