"""Options shared by the commands that load a model (`dop eval`, `dop search`), and the
model loading they ask for."""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from .. import distributed
from ..evaluate.datasets import set_max_image_pixels
from ..evaluate import loading

DTYPES = ("float32", "bfloat16", "float16")
DATA_METAVAR = "shapes:SPLIT[:SEED]|FILE.jsonl|PARQUET|HF_FOLDER|hf:OWNER/NAME[:CONFIG]:SPLIT"
COLUMNS_HELP = ("Hugging Face data sets: which column plays which role, e.g. question=query,answers=label,"
                "options=A+B+C+D,task=category (roles: image, question, answers, task, hint, options; "
                "default: found by name, see docs/eval.md)")


def add_model_runtime_options(p) -> None:
    """--device, --dtype, --attn-implementation, --trust-remote-code, --threads, --no-progress,
    --max-image-pixels."""
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")
    p.add_argument("--attn-implementation", default="sdpa", help="attention backend (default sdpa)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own code to run (off by default)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice); 1 gives steadier times on a busy machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the weight-loading bar included)")
    add_image_limit_option(p)


def add_image_limit_option(p) -> None:
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default: PIL's limit, about 89 million)")


def apply_image_limit(args) -> None:
    """Set the data sets' image pixel limit from ``--max-image-pixels`` (checked here)."""
    n = getattr(args, "max_image_pixels", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--max-image-pixels must be a positive integer, got {n}")

    set_max_image_pixels(n)


def load_model_quietly(args, dtype):
    """``load_model`` with the options of :func:`add_model_runtime_options`, without
    transformers' weight-loading bar under --no-progress (or on ranks other than 0)."""
    quiet = (args.no_progress or not distributed.is_main()) and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return loading.load_model(  # looked up when called: tests replace it to catch a load
            args.model, attn_implementation=args.attn_implementation, dtype=dtype,
            trust_remote_code=args.trust_remote_code,
        )
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
