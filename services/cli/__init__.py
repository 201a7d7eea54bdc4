"""The `afd` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys

from services.cli import generate, init_checkpoint

SUBCOMMANDS = (init_checkpoint, generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="afd", description="Attention-FFN disaggregated serving for Step-3-style models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        # User mistakes (bad config, missing tensor, prompt too long, a path that is a file)
        # end in one clear line.
        print(f"afd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
