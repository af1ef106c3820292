"""The `dop` command. Each subcommand lives in `dop/commands/<name>.py` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code).

A command's module is imported only when that command is given (:func:`command_module`): it
may load torch and transformers at import, while `dop --help` lists the commands from
:data:`dop.commands.COMMANDS` alone and loads nothing heavy (docs/design.md, "Imports")."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from . import distributed
from .commands import COMMANDS
from .outputs import OutputLockedError

# commands that share their samples among the processes of `torchrun ... -m dop` (dop/distributed.py)
DISTRIBUTED = ("run", "search", "eval")


def available_commands() -> list[str]:
    """The commands of :data:`~dop.commands.COMMANDS` whose module is installed (found without
    importing it); a module that is absent is simply not offered."""
    return [name for name in COMMANDS if importlib.util.find_spec(f"{__package__}.commands.{name}") is not None]


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (`dop/commands/<name>.py`), imported now."""
    return importlib.import_module(f"{__package__}.commands.{name}")  # heavy: a command may load torch


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `dop` parser: every available command with its line of ``COMMANDS``, and
    ``command``'s own parser (arguments, description, ``func``) from its module."""
    parser = argparse.ArgumentParser(
        prog="dop",
        description="Depth-wise Operation Pruning for multimodal LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in available_commands():
        if name == command:
            command_module(name).register(sub)
        else:
            sub.add_parser(name, help=COMMANDS[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
