"""Run a model (optionally under a pruning policy) over a data set and score it.

Per sample, at batch size 1: build the prompt, run the processor, time one prefill,
generate greedily, decode the new tokens, score them against the references.

- **Prefill time** is measured on a separate forward pass over the whole prompt
  (``model(**inputs, use_cache=True, logits_to_keep=1)``, as generation's first step does),
  timed with ``time.perf_counter`` around the call (CUDA synchronised on both sides),
  under ``torch.inference_mode``. The first sample of a run (of each rank's share, under
  torch.distributed) is a warm-up and is left out of the mean when there are others. The
  pass costs one extra prefill per sample; ``time_prefill=False`` skips it.
- Under a process group of several ranks (:mod:`dop.distributed`) each rank runs its share
  of the samples and the per-sample results are gathered in sample order, so every figure
  but the times is one process's.
- **FLOPs** come from ``dop.count_flops`` in both conventions (``dop``: all decoder
  matrix products of the prefill; ``paper``: the published token-pruning formula) for
  each sample's measured visual-token count (per image, through the family's adapter)
  and text-token count (the rest of the prompt), and are averaged over samples.
- With a policy, the unpruned model is evaluated too (unless a baseline result is
  passed in) so that Rel. Avg. can be reported.
"""

from __future__ import annotations

import copy
import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import distributed as dd
from ..flops import CONVENTIONS, count_flops
from ..models import get_adapter
from ..policy import Policy
from ..runtime import apply_policy
from .datasets import Sample, as_sample
from .inputs import sample_inputs
from .loading import num_decoder_layers, prompt_builder_for_model
from .metrics import TaskScore, average, rel_avg, score_tasks, vqa_accuracy

DEFAULT_MAX_NEW_TOKENS = 10


@dataclass
class SampleResult:
    index: int
    task: str
    question: str
    answers: list[str]
    prediction: str
    score: float
    num_visual_tokens: int
    num_text_tokens: int
    prefill_ms: float | None = None
    visual_counts: tuple[int, ...] = ()  # per image (num_visual_tokens is the first image's)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out.pop("visual_counts")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SampleResult":
        """The inverse of :meth:`to_dict` (``visual_counts`` is not stored)."""
        return cls(index=d["index"], task=d["task"], question=d["question"], answers=list(d["answers"]),
                   prediction=d["prediction"], score=d["score"], num_visual_tokens=d["num_visual_tokens"],
                   num_text_tokens=d["num_text_tokens"], prefill_ms=d.get("prefill_ms"))


@dataclass
class EvalResult:
    """Scores and costs of one pass over a data set. Accuracies are fractions in [0, 1];
    FLOPs are per sample (mean), in FLOPs; times in milliseconds."""

    samples: list[SampleResult]
    tasks: dict[str, TaskScore]
    average: float
    prefill_ms: float | None
    flops: dict[str, dict[str, float]] | None  # {"dop"|"paper": {"decoder": x, "total": y}}
    num_visual_tokens: float
    num_text_tokens: float
    policy: Any = None
    ranker: str | None = None
    wall_s: float = 0.0
    baseline: "EvalResult | None" = None
    rel_avg: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        """A stored evaluation (``to_dict(with_samples=True)``) read back: scores, samples and
        costs, enough to serve as another evaluation's ``baseline``."""
        return cls(
            samples=[SampleResult.from_dict(s) for s in d.get("samples", [])],
            tasks={t: TaskScore.from_dict(t, s) for t, s in d["tasks"].items()},
            average=d["average"], prefill_ms=d.get("prefill_ms"), flops=d.get("flops"),
            num_visual_tokens=d.get("num_visual_tokens", 0), num_text_tokens=d.get("num_text_tokens", 0),
            ranker=d.get("ranker"), wall_s=d.get("wall_s", 0.0), rel_avg=d.get("rel_avg"),
        )

    def to_dict(self, with_samples: bool = True) -> dict:
        out = {
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "ranker": self.ranker,
            "num_samples": len(self.samples),
            "tasks": {t: s.to_dict() for t, s in self.tasks.items()},
            "average": self.average,
            "rel_avg": self.rel_avg,
            "flops": self.flops,
            "num_visual_tokens": self.num_visual_tokens,
            "num_text_tokens": self.num_text_tokens,
            "prefill_ms": self.prefill_ms,
            "wall_s": self.wall_s,
        }
        if with_samples:
            out["samples"] = [s.to_dict() for s in self.samples]
        return out


def _decoder_layers(model) -> int:
    return num_decoder_layers(model)


def _row_counts(adapter, inputs: dict, rows: int) -> list[list[int]]:
    """Per batch row, the visual tokens of each of its images."""
    out: list[list[int]] = [[] for _ in range(rows)]
    for span in adapter.image_spans(inputs["input_ids"], inputs):
        out[span.row].append(span.n)
    return out


def greedy_config(model, max_new_tokens: int, tokenizer):
    """The model's generation config for greedy decoding of at most ``max_new_tokens``
    (sampling settings cleared; padding by the tokenizer's pad token, else end of sequence)."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.do_sample = False
    cfg.num_beams = 1
    for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    cfg.max_new_tokens = int(max_new_tokens)
    cfg.max_length = None
    if cfg.pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        cfg.pad_token_id = pad if pad is not None else cfg.eos_token_id
    return cfg


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer around a forward pass measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FlopsCache:
    """FLOPs of a prompt under ``policy`` in every convention, by its visual-token counts and
    text-token count (``{convention: {"decoder", "total"}}``), each shape counted once."""

    def __init__(self, model, policy):
        self._count, self._model, self._policy, self._memo = count_flops, model, policy, {}

    def __call__(self, counts: tuple[int, ...], n_text: int) -> dict[str, dict[str, float]]:
        key = (tuple(counts), n_text)
        if key not in self._memo:
            out = {}
            for conv in CONVENTIONS:
                r = self._count(
                    self._model, self._policy,
                    num_visual_tokens=list(counts), num_text_tokens=n_text, convention=conv,
                )
                out[conv] = {"decoder": float(r.decoder), "total": float(r.total)}
            self._memo[key] = out
        return self._memo[key]


def evaluate(
    model,
    processor,
    samples: Sequence[Sample | dict],
    policy=None,
    ranker=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    *,
    build_prompt: Callable[[Any, str], str] | None = None,
    baseline: EvalResult | None = None,
    run_baseline: bool = True,
    time_prefill: bool = True,
    seed: int | None = 0,
    desc: str | None = None,
    batch_size: int = 1,
) -> EvalResult:
    """Evaluate ``model`` on ``samples``; see the module docstring for what is measured.

    ``policy`` (a :class:`dop.Policy` or a policy file path) is applied with
    ``dop.apply_policy(model, policy, ranker)``; its layer count must match the model's (checked before any work). With a
    policy, ``baseline`` (an unpruned :class:`EvalResult` on the same samples) is used for
    Rel. Avg., or computed when None and ``run_baseline``. ``build_prompt(processor,
    question)`` defaults to :func:`dop.evaluate.loading.prompt_builder_for_model` (the
    demo's own format for the demo model, the chat template otherwise). ``seed`` seeds torch before each pass (for
    random rankers); None leaves the generator alone. ``batch_size`` prompts run together
    (padded on the left); the predictions equal batch size 1's.
    """
    samples, policy = _checked_arguments(model, samples, policy, ranker, baseline, max_new_tokens, batch_size)
    if build_prompt is None:  # the demo model gets its own prompt format, others the chat template
        build_prompt = prompt_builder_for_model(model)
    build_prompt(processor, samples[0].question)  # a processor without a chat template fails here

    result = _run_pass(
        model, processor, samples, policy, ranker, max_new_tokens, progress,
        build_prompt, time_prefill, seed, desc or ("pruned" if policy is not None else "eval"), int(batch_size),
    )
    if policy is not None:
        if baseline is None and run_baseline:
            baseline = _run_pass(
                model, processor, samples, None, None, max_new_tokens, progress,
                build_prompt, time_prefill, seed, "unpruned", int(batch_size),
            )
        if baseline is not None:
            result.baseline = baseline
            result.rel_avg = rel_avg(result.tasks, baseline.tasks)
    return result


def _checked_arguments(model, samples, policy, ranker, baseline, max_new_tokens, batch_size) -> tuple[list, Any]:
    """:func:`evaluate`'s samples and policy (read from its file when a path), checked before
    any work: one-line errors for bad counts, a policy for another layer count, a ranker
    without a policy and a baseline over other samples."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    samples = [as_sample(s, i) for i, s in enumerate(samples)]
    if not samples:
        raise ValueError("evaluate: no samples")
    if policy is not None:
        if not hasattr(policy, "check_layers"):  # a path to a policy file
            policy = Policy.from_json(policy)
        policy = policy.check_layers(_decoder_layers(model))
    elif ranker is not None:
        raise ValueError("a ranker only applies together with a policy")
    if baseline is not None and len(baseline.samples) != len(samples):
        raise ValueError(
            f"baseline covers {len(baseline.samples)} samples but {len(samples)} are evaluated"
        )
    return samples, policy


def _run_pass(model, processor, samples, policy, ranker, max_new_tokens, progress,
              build_prompt, time_prefill, seed, desc, batch_size: int = 1) -> EvalResult:
    tokenizer = getattr(processor, "tokenizer", processor)
    step = _BatchStep(model, processor, tokenizer, greedy_config(model, max_new_tokens, tokenizer), build_prompt,
                      time_prefill)
    if seed is not None:
        torch.manual_seed(seed)
    ctx, ranker_name = _policy_context(model, policy, ranker)
    mine = dd.shard(len(samples))  # this rank's samples (all of them in one process)
    results: list[SampleResult] = []
    t_start = time.perf_counter()
    bar = dd.JobProgress(len(samples), desc=desc, unit="sample", disable=not progress)
    with ctx, torch.inference_mode():
        for first in range(0, len(mine), batch_size):
            ids = list(mine[first:first + batch_size])
            results.extend(step(ids, [samples[i] for i in ids]))
            bar.update(len(ids))
            if progress:
                bar.set_postfix(acc=f"{sum(r.score for r in results) / len(results):.3f}")
    bar.wait(len(samples))
    bar.close()
    times = [r.prefill_ms for r in results if r.prefill_ms is not None]
    if len(times) > 1:
        times = times[1:]  # the first sample (of each rank) warms up caches and kernels
    times = [t for part in dd.all_gather(times) for t in part]
    results = dd.gather_ordered({r.index: r for r in results}, len(samples))
    return _summary(results, times, FlopsCache(model, policy), policy, ranker_name, time.perf_counter() - t_start)


def _policy_context(model, policy, ranker):
    """The policy applied for the pass (a null context without one) and the ranker's name as
    reported: as given (keeps options such as "random:seed=3"), else the one resolved."""
    if policy is None:
        return nullcontext(), None
    spec = policy.ranker_or(ranker)  # the one rule (docs/design.md, "Policies")
    ctx = apply_policy(model, policy, ranker=spec)
    return ctx, spec if isinstance(spec, str) else getattr(ctx.ranker, "name", None)


class _BatchStep:
    """Prompts of one batch of samples -> greedy answers, scores and token counts (and the
    prefill time per sample when asked)."""

    def __init__(self, model, processor, tokenizer, gen_cfg, build_prompt, time_prefill: bool):
        self.model, self.processor, self.tokenizer, self.gen_cfg = model, processor, tokenizer, gen_cfg
        self.build_prompt, self.time_prefill = build_prompt, time_prefill
        self.adapter = get_adapter(model)
        self.param = next(model.parameters())
        accepts_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if accepts_keep else {}

    def __call__(self, ids: list[int], chunk: list) -> list[SampleResult]:
        inputs, prompts = sample_inputs(self.processor, self.build_prompt, chunk, self.param)
        input_ids = inputs["input_ids"]
        counts = _row_counts(self.adapter, inputs, len(chunk))
        for s, c, prompt in zip(chunk, counts, prompts):
            if not c:
                raise ValueError(f"{s.where}: the prompt holds no visual tokens; the prompt builder must place "
                                 f"the image (got {prompt!r})")
        prefill_ms = self._prefill_ms(inputs, len(chunk)) if self.time_prefill else None
        out = self.model.generate(**inputs, generation_config=self.gen_cfg)
        mask = inputs.get("attention_mask")
        results = []
        for row, (i, s, c) in enumerate(zip(ids, chunk, counts)):
            prediction = self.tokenizer.decode(out[row, input_ids.shape[1]:], skip_special_tokens=True).strip()
            length = int(mask[row].sum()) if mask is not None else int(input_ids.shape[1])
            results.append(SampleResult(
                index=i, task=s.task, question=s.question, answers=list(s.answers),
                prediction=prediction, score=vqa_accuracy(prediction, s.answers), num_visual_tokens=c[0],
                num_text_tokens=length - sum(c), prefill_ms=prefill_ms, visual_counts=tuple(c),
            ))
        return results

    def _prefill_ms(self, inputs: dict, rows: int) -> float:
        """One prefill of the batch, timed, per sample of the batch."""
        _sync(self.param.device)
        t0 = time.perf_counter()
        self.model(**inputs, use_cache=True, **self.extra)
        _sync(self.param.device)
        return (time.perf_counter() - t0) * 1000.0 / rows


def _summary(results: list[SampleResult], times: list[float], flops_of, policy, ranker_name, wall: float) -> EvalResult:
    """Scores per task, mean FLOPs per sample in both conventions, mean token counts."""
    tasks = score_tasks(r.to_dict() for r in results)
    per_sample = [flops_of(r.visual_counts, r.num_text_tokens) for r in results]
    flops = {conv: {part: sum(f[conv][part] for f in per_sample) / len(per_sample) for part in ("decoder", "total")}
             for conv in CONVENTIONS}
    n = len(results)
    return EvalResult(
        samples=results,
        tasks=tasks,
        average=average(tasks),
        prefill_ms=sum(times) / len(times) if times else None,
        flops=flops,
        num_visual_tokens=sum(r.num_visual_tokens for r in results) / n,
        num_text_tokens=sum(r.num_text_tokens for r in results) / n,
        policy=policy,
        ranker=ranker_name,
        wall_s=wall,
    )
