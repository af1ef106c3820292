"""The `dop` command. Each subcommand lives in `dop/commands/<name>.py` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys

# order shown in `dop --help`; a module that is absent is simply not offered
COMMANDS = ("run", "search", "eval", "baseline", "flops", "transfer", "data")  # modules in dop/commands/
# commands that share their samples among the processes of `torchrun ... -m dop` (dop/distributed.py)
DISTRIBUTED = ("run", "search", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dop",
        description="Depth-wise Operation Pruning for multimodal LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"dop.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"dop.commands.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import distributed

    try:
        if args.command in DISTRIBUTED:
            distributed.init_from_env()  # under torchrun: join the job (docs/scaling.md)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"dop: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
