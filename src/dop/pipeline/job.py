"""One main job's shared state (:class:`Job`): its options, the loaded model and data, the
reference prompt's shape and the stage bookkeeping; and how it is loaded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import distributed as dd
from ..evaluate import loading
from ..evaluate.datasets import as_sample, load_dataset
from ..evaluate.heldout import heldout_samples
from ..evaluate.hf import is_hf_spec
from ..evaluate.inputs import prompt_shape, sample_inputs
from ..evaluate.loading import prompt_builder_for
from ..models import get_adapter
from ..report.stages import Stages
from .options import RunOptions
from .timing import load_average


@dataclass
class Job:
    """What every step of one main job reads: the options, the loaded model and data, the
    reference prompt's shape and the stage bookkeeping."""

    opts: RunOptions
    out: Path
    log: Callable[[str], None]
    stages: Stages
    model: Any
    processor: Any
    val: list
    test: list
    heldout: list  # samples of the held-out verification (empty: none)
    heldout_where: str
    build_prompt: Callable
    num_layers: int
    n_visual: int
    n_text: int
    load_before: list
    spaces: dict = field(default_factory=dict)  # space -> its search stage (searches.space_stage), once run
    compared: dict = field(default_factory=dict)  # method -> its search stage (searches.method_stage), once run
    heldout_set: Any = None  # the held-out samples prepared, with their reference logits (SampleSet)

    @property
    def common(self) -> dict:
        o = self.opts
        return dict(model=o.model, data=o.data, samples=o.samples, ranker=o.ranker, seed=o.seed)


def load_job(opts: RunOptions, out: Path, log: Callable[[str], None], stages: Stages) -> Job:
    """The data sets (a bad one fails before the model loads), the model and the shape of the
    reference prompt (the first test sample)."""
    log(f"[load] model {opts.model!r}, validation {opts.data!r} ({opts.samples}), test {opts.test_data!r} ({opts.test_samples})")
    t0 = time.perf_counter()
    load_before = load_average()

    def columns(spec):  # --columns names the columns of whichever of the two is a Hugging Face data set
        return opts.columns if is_hf_spec(spec) else None

    val = load_dataset(opts.data, limit=opts.samples, columns=columns(opts.data))
    test = load_dataset(opts.test_data, limit=opts.test_samples, columns=columns(opts.test_data))
    heldout, where = ([], "none: --verify 0") if not opts.verify else heldout_samples(
        opts.data, opts.samples, opts.heldout_n, opts.verify_data, opts.columns)
    if opts.verify and not heldout:
        log(f"[load] no held-out samples ({where}): the searches are verified in-sample only")
    # looked up when called, not bound at import: a test that replaces it for a while leaves no trace here
    model, processor = load_model(opts, loading.load_model)
    if dd.is_distributed():
        model = model.to(dd.device_for())  # one device per rank: cuda:LOCAL_RANK, or the CPU
    build_prompt = prompt_builder_for(opts.model)
    adapter = get_adapter(model)
    n_visual, n_text = first_prompt_shape(processor, adapter, build_prompt, test[0])
    stages.times["load"] = time.perf_counter() - t0
    return Job(opts, out, log, stages, model, processor, val, test, heldout, where, build_prompt,
                adapter.num_layers, n_visual, n_text, load_before)


def load_model(opts: RunOptions, loader):
    """``loader`` (:func:`dop.evaluate.loading.load_model`), without transformers'
    weight-loading bar when progress is off."""
    from transformers.utils import logging as hf_logging  # heavy: transformers, only to silence a bar

    quiet = not opts.progress and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return loader(opts.model, attn_implementation=opts.attn_implementation)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def first_prompt_shape(processor, adapter, build_prompt, sample) -> tuple[int, int]:
    """(visual tokens of the first image, text tokens) of one prompt."""
    counts, text = prompt_shape(adapter, sample_inputs(processor, build_prompt, [as_sample(sample)])[0])
    if not counts:
        raise ValueError("the processor produced no image tokens for the first test sample")
    return counts[0], text


def verify_key(job: Job) -> dict:
    """The verification options of the search stages' key (none with --verify 0, so that the
    keys of runs made before held-out verification stay valid)."""
    o = job.opts
    return dict(verify=o.verify, verify_data=o.verify_data, verify_samples=len(job.heldout)) if o.verify else {}


def slug(text: str) -> str:
    keep = [c if c.isalnum() else "-" for c in text.lower()]
    return "-".join(filter(None, "".join(keep).split("-")))


def quiet(_msg: str) -> None:
    pass
