"""The `dop` command. Each subcommand lives in `dop/commands/<name>.py` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dop.outputs import OutputLockedError

# order shown in `dop --help`; a module that is absent is simply not offered
COMMANDS = ("run", "search", "eval", "baseline", "flops", "transfer", "data", "serve")  # modules in dop/commands/
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
    from . import distributed  # lazy: spares torch until used

    try:
        if args.command in DISTRIBUTED:
            distributed.init_from_env()  # under torchrun: join the job (docs/scaling.md)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, never a traceback (DOP_DEBUG=1 shows it)
        if os.environ.get("DOP_DEBUG"):
            raise
        code, text = error_line(e)
        print(f"dop: error: {text}", file=sys.stderr)
        return code
    finally:
        distributed.shutdown()


# exit codes: 2 = the input or an option is wrong (nothing was done, or the message says
# what was kept); 1 = the work failed for another reason (the system, a lock, a bug)
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def error_line(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that ends a command."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, USER_ERRORS):
        return 2, text
    if isinstance(e, RecursionError):
        return 2, f"input nested too deeply to read ({text})"
    if isinstance(e, MemoryError):
        return 1, "out of memory"
    if isinstance(e, OSError):
        return 1, text

    if isinstance(e, OutputLockedError):
        return 1, text
    return 1, f"internal error ({type(e).__name__}: {text}); rerun with DOP_DEBUG=1 for the traceback and report it"


if __name__ == "__main__":
    sys.exit(main())
