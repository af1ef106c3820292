"""Early start: run the decoder from layer ``d`` on, under a policy, from cached layer inputs.

A policy that processes every visual token at every op below layer ``d`` leaves the inputs of
layers ``0..d`` equal to the unpruned run's. A search that evaluates many such policies on the
same prompt therefore caches, once per prompt, the unpruned input of every decoder layer (and
the keyword arguments each layer received: mask, position embeddings, ...) and then runs only
layers ``d..L-1`` (plus the final norm and the LM head at the last position) per policy:

    prefix = capture_prefix(model, inputs)                  # unpruned run, with hooks
    ranks = capture_ranks(model, inputs, ranker)            # the ranks a pruned run would use
    with apply_policy(model, policy, ranker=ranker) as h:
        logits = replay_from(h, prefix, ranks, start=d)     # == the full pruned forward's

Nothing of the layer math is copied here: the handle's wrapped layers compute, this module
only sets up the :class:`ForwardState` they read (the depths come from the given ranks, as in
the full forward) and calls them in order. Rankers that re-rank inside the LLM (FastV-like)
get their re-ranking calls at layers ``>= d`` from the wrapped layers themselves; the ranks of
layers ``< d`` come from :func:`capture_ranks`, recorded under a policy that keeps every token
active, which is what any policy starting at ``d`` does below ``d``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..models import get_adapter
from ..models.prefix import run_to_layers
from ..policy import Policy
from ..rankers.base import ranks_settled_at
from . import apply_policy
from .layer import is_patched
from .session import ForwardState


@dataclass
class PrefixCache:
    """The unpruned run of one prompt, or of a batch padded on the left."""

    hidden: list[torch.Tensor]  # input of each decoder layer, (B, S, d)
    kwargs: list[dict]  # keyword arguments each decoder layer received
    logits: torch.Tensor  # (B, vocab) float32 logits of the last position of each row
    inputs: dict  # the model inputs (a batch padded on the left, or one prompt)


def _forward_kwargs(model) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def last_logits(model, inputs: dict) -> torch.Tensor:
    """(vocab,) float32 logits of the last position of one prompt's full forward."""
    return batch_last_logits(model, inputs)[0]


def batch_last_logits(model, inputs: dict) -> torch.Tensor:
    """(B, vocab) float32 logits of the last position of each row (batches padded on the left)."""
    out = model(**inputs, use_cache=False, **_forward_kwargs(model))
    return out.logits[:, -1].float()


def capture_prefix(model, inputs: dict) -> PrefixCache:
    """Run the unpruned model once and keep every decoder layer's input."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers()
    if any(is_patched(layer) for layer in layers):
        raise ValueError("capture_prefix needs the unmodified model; remove the applied policy first")
    seen, out = run_to_layers(model, inputs, range(len(layers)), adapter=adapter, stop=False, **_forward_kwargs(model))
    if len(seen) != len(layers):
        raise RuntimeError("the model's forward skipped some decoder layers; cannot cache their inputs")
    odd = [i for i, x in seen.items() if x.extra_args]
    if odd:
        raise RuntimeError(f"decoder layer {odd[0]} got positional arguments past hidden_states; not supported")
    ordered = [seen[i] for i in range(len(layers))]
    return PrefixCache([x.hidden for x in ordered], [x.kwargs for x in ordered], out.logits[:, -1].float(), dict(inputs))


def capture_ranks(model, inputs: dict, ranker, groups: list[float] | None = None) -> dict[int, list[torch.Tensor]]:
    """The ranks (per image) in force at the start of each layer ``l >= 1`` of a pruned forward
    whose policy keeps every visual token active (and counted in ``n_keep``) below ``l``.

    Recorded from a real forward (the vision tower runs, so rankers that hook it see it)
    under a policy that skips only the MLP at the last layer; the forward stops as soon as the
    last re-ranking layer of the ranker has been passed. Layers past that share its ranks."""
    adapter = get_adapter(model)
    L = adapter.num_layers
    groups = list(groups or [1.0])
    if L <= 1:
        return {}
    probe = Policy(L, groups, {"mlp": [L - 1] * len(groups)})
    out: dict[int, list[torch.Tensor]] = {}
    with apply_policy(model, probe, ranker=ranker) as handle:
        last = ranks_settled_at(handle.ranker, L)

        def record(i, _):
            st = handle.session.current
            if st is None or st.ranks is None:
                raise RuntimeError("the probe forward set no ranks (no visual tokens in the prompt?)")
            out[i] = [r.clone() for r in st.ranks]

        run_to_layers(model, inputs, range(1, last + 1), adapter=adapter, observe=record)
    for i in range(last + 1, L):
        out[i] = out[last]
    return out


def replay_from(handle, prefix: PrefixCache, ranks: dict[int, list[torch.Tensor]], start: int) -> torch.Tensor:
    """(B, vocab) float32 last-position logits of the pruned forward of ``prefix.inputs`` under
    ``handle``'s policy, computing only decoder layers ``start..L-1``.

    The policy must process every visual token by every op below ``start`` (else the cached
    inputs would be wrong: ValueError). ``ranks`` is :func:`capture_ranks`' output."""
    s = handle.session
    L = s.num_layers
    if not (1 <= start < L):
        raise ValueError(f"start must lie in [1, {L - 1}] (layer 0 needs the full forward), got {start}")
    if handle.policy.max_active_depth() < start:
        raise ValueError(
            f"the policy skips an op from layer {handle.policy.max_active_depth()}, below start={start}; "
            "its layer inputs differ from the unpruned run's"
        )
    st = prompt_state(handle.adapter, prefix.inputs)
    if st.has_visual and not s.unpruned:
        s.assign_ranks(st, [r.clone() for r in ranks[start]])
    return run_layers(handle, st, prefix.hidden[start], start, prefix.kwargs[start:])


def prompt_state(adapter, inputs: dict) -> ForwardState:
    """The forward state of the prompt rows of ``inputs`` (one prompt, or a batch padded on
    the left) before any depth is assigned."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    present = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    return ForwardState(past=0, batch=int(ids.shape[0]), n_new=int(ids.shape[1]), spans=adapter.image_spans(ids, inputs),
                        inputs=dict(inputs), record=None, present=present, device=ids.device)


def run_layers(handle, st: ForwardState, h: torch.Tensor, start: int, kwargs: list[dict],
               fresh_rows: bool = False) -> torch.Tensor:
    """(rows, vocab) float32 last-position logits of ``handle``'s wrapped decoder layers
    ``start..L-1`` run on ``h`` under ``st`` (``kwargs``: each of those layers' keyword
    arguments, in order), then the final norm and the LM head at the last position.

    ``fresh_rows``: each layer's rows worked out afresh from ``st``'s depths, for rows whose
    depths are not the handle's policy's (its depth bands key the row cache)."""
    s = handle.session
    layers = handle.adapter.decoder_layers()
    s.current = st
    try:
        for l, kw in zip(range(start, s.num_layers), kwargs, strict=True):
            if fresh_rows:
                st.rows_cache.clear()
            h = layers[l](h, **kw)
            if isinstance(h, tuple):
                h = h[0]
    finally:
        s.current = None
    h = handle.adapter.final_norm(h[:, -1:])
    return handle.adapter.output_logits(h)[:, -1].float()
