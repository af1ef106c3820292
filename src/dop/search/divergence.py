"""First-token divergence: KL(p || q) between the unpruned (p) and pruned (q) model's
distributions over the first generated token, full vocabulary, float32 softmax; a sample
set's divergence is the mean over its samples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..evaluate.datasets import Sample, as_sample
from ..evaluate.inputs import prompt_shape, sample_inputs
from ..evaluate.loading import prompt_builder_for_model
from ..models import get_adapter
from ..runtime import apply_policy
from ..runtime.replay import last_logits


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) over the last dimension, in float32 (nats)."""
    lp = F.log_softmax(p_logits.float().reshape(-1), dim=-1)
    lq = F.log_softmax(q_logits.float().reshape(-1), dim=-1)
    return float(torch.sum(lp.exp() * (lp - lq)))


@dataclass
class PreparedSample:
    """Model inputs of one validation sample (batch of 1) and its token counts."""

    inputs: dict
    visual_counts: list[int]  # per image
    text_tokens: int
    where: str = ""


def prepare_samples(model, processor, samples: Sequence[Sample | dict],
                    build_prompt: Callable | None = None) -> list[PreparedSample]:
    """Prompt (``build_prompt(processor, question)``, default
    :func:`dop.evaluate.loading.prompt_builder_for_model`: the demo's own format for the demo
    model, the chat template otherwise) and processor inputs of every sample."""

    if build_prompt is None:  # the demo model gets its own prompt format, others the chat template
        build_prompt = prompt_builder_for_model(model)
    adapter = get_adapter(model)
    param = next(model.parameters())
    out = []
    for i, s in enumerate(samples):
        s = as_sample(s, i)
        inputs, (prompt,) = sample_inputs(processor, build_prompt, [s], param)
        counts, text = prompt_shape(adapter, inputs)
        if not counts:
            raise ValueError(f"{s.where or f'sample #{i}'}: the prompt holds no visual tokens (prompt {prompt!r})")
        out.append(PreparedSample(inputs, counts, text, s.where))
    return out


def reference_shape(prepared: Sequence[PreparedSample]) -> tuple[list[int], int]:
    """The prompt shape the search prices policies at: the most common per-image visual
    counts and the mean text length (rounded)."""

    counts = Counter(tuple(p.visual_counts) for p in prepared).most_common(1)[0][0]
    text = int(round(sum(p.text_tokens for p in prepared) / len(prepared)))
    return list(counts), text


@torch.inference_mode()
def true_divergence(model, prepared: Sequence[PreparedSample], refs: Sequence[torch.Tensor],
                    policy, ranker) -> tuple[float, list[float]]:
    """Mean (and per-sample) KL of the full pruned forward under ``policy`` against ``refs``
    (the unpruned last-position logits)."""

    per = []
    with apply_policy(model, policy, ranker=ranker):
        for s, p in zip(prepared, refs):
            per.append(kl_divergence(p, last_logits(model, s.inputs)))
    return sum(per) / len(per), per
