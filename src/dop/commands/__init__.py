"""The `dop` subcommands, one module each (`dop/commands/<name>.py`, ``register(subparsers)``).

:data:`COMMANDS` is the one list of them: `dop --help` shows it without importing any command
module, and each module's parser takes its one-line help from it."""

from __future__ import annotations

# the commands in the order `dop --help` shows them, with the line it shows
COMMANDS = {
    "run": "the main job: search, apply, compare with token pruners, report",
    "search": "search a pruning policy under a FLOPs budget (first-token KL, additive proxy, exact solver)",
    "eval": "accuracy, FLOPs and prefill time on a data set, pruned or not",
    "baseline": "policy + ranker of a published token-pruning method",
    "flops": "prefill FLOPs of a model, unpruned vs under a policy",
    "transfer": "rescale a policy's depths to a model with another layer count",
    "data": "synthetic benchmark data",
    "serve": "serve a model under a policy with vLLM's OpenAI-compatible server",
}
