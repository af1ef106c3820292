"""Several divergence-table entries of one prompt in one batched forward (docs/design.md,
"Search", "Table cost").

Entries whose change starts at the same layer ``d`` (every ``n_v`` value; ``D_attn`` and
``D_mlp`` at the same depth) share the cached unpruned input of layer ``d``
(:func:`dop.runtime.replay.capture_prefix`). Each candidate policy's per-token depths are
worked out by the runtime's own session (:func:`candidate_depths`: the ranker runs with the
candidate's ``n_keep``, as in its full forward); :func:`replay_candidates` then stacks the
candidates as batch rows (candidate-major: row ``j * B + b`` is candidate ``j`` on prompt row
``b``) and runs the wrapped layers ``d..L-1`` once over all of them. The wrapped layers
compute every row under that row's depths exactly as a forward of that row alone does
(padded batches, docs/design.md "Batches"), so each candidate's logits are its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.prefix import run_to_layers
from ..policy import OP_KINDS, Policy
from ..rankers.base import rerank_layers
from ..runtime import apply_policy
from ..runtime.replay import PrefixCache, prompt_state, run_layers
from ..runtime.session import ForwardState


@dataclass
class CandidateState:
    """One candidate policy on the prompt rows of a prefix: its per-token depths and ranks."""

    depths: dict[str, torch.Tensor]  # kind -> (B, S) int64
    ranks: list[torch.Tensor]  # per image span of the B rows
    groups: torch.Tensor  # (B, S) int64: policy group of each visual token, -1 for the rest


def candidate_depths(model, prefix: PrefixCache, policy: Policy, ranker, ranks: dict, start: int) -> CandidateState:
    """The depths every token of ``prefix``'s rows has under ``policy`` from layer ``start`` on.

    ``start == 0``: the ranker ranks with this policy's ``n_keep`` (a forward stopped at the
    input of layer 0: the vision tower runs, no decoder layer). ``start >= 1``: the ranks in
    force at ``start`` (``ranks``, :func:`dop.runtime.replay.capture_ranks`), as
    :func:`~dop.runtime.replay.replay_from` uses them."""
    if policy.skip:  # the rows of one batched forward share the handle's per-layer skips
        raise ValueError("candidate_depths: a policy with per-layer skips cannot be a batched table candidate")
    if policy.max_active_depth() < start:
        raise ValueError(f"the policy skips an op from layer {policy.max_active_depth()}, below start={start}")
    with apply_policy(model, policy, ranker=ranker) as handle:
        s = handle.session
        if start == 0:
            got = {}

            def rank(_, layer_input):
                st = s.current
                s.prepare(st, layer_input.hidden)
                got["state"] = st

            run_to_layers(model, prefix.inputs, [0], adapter=handle.adapter, observe=rank)
            st = got["state"]
            return CandidateState(st.depths, list(st.ranks), st.groups)
        st = prompt_state(handle.adapter, prefix.inputs)
        s.assign_ranks(st, [r.clone() for r in ranks[start]])
        return CandidateState(st.depths, st.ranks, st.groups)


def _tiled(x, times: int, rows: int):
    """``x`` repeated ``times`` along its batch dimension (tensors of batch 1 broadcast as they are)."""
    if isinstance(x, tuple):
        return tuple(_tiled(t, times, rows) for t in x)
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and rows > 1 and x.shape[0] == rows:
        return x.repeat(times, *[1] * (x.dim() - 1))
    return x


def _stacked_state(handle, prefix: PrefixCache, states: list[CandidateState]) -> ForwardState:
    """The forward state of every candidate's copy of the prompt rows, candidate-major."""
    one = prompt_state(handle.adapter, prefix.inputs)
    B, V = one.batch, len(states)
    spans = [replace(sp, row=sp.row + j * B) for j in range(V) for sp in one.spans]
    st = ForwardState(past=0, batch=B * V, n_new=one.n_new, spans=spans, inputs=one.inputs, record=None,
                      present=one.present.repeat(V, 1), device=one.device)
    st.depths = {k: torch.cat([c.depths[k] for c in states]) for k in OP_KINDS}
    st.ranks = [r for c in states for r in c.ranks]
    st.groups = torch.cat([c.groups for c in states])
    return st


def replay_candidates(handle, prefix: PrefixCache, states: list[CandidateState], start: int) -> torch.Tensor:
    """(V, B, vocab) float32 last-position logits of V candidates on the B prompt rows of
    ``prefix``, computing decoder layers ``start..L-1`` once for all of them. ``handle``: an
    applied pruning policy (its wrapped layers compute; each row's depths come from ``states``)."""
    s = handle.session
    L = s.num_layers
    if not (0 <= start < L):
        raise ValueError(f"start must lie in [0, {L - 1}], got {start}")
    if s.unpruned:
        raise ValueError("replay_candidates needs a handle of a pruning policy (an unpruned one bypasses the layers)")
    if any(l >= start for l in rerank_layers(s.ranker)):
        raise ValueError(f"the ranker re-ranks at layer {max(rerank_layers(s.ranker))}, at or past start={start}")
    B, V = int(prefix.hidden[start].shape[0]), len(states)
    kwargs = [_tiled_kwargs(kw, V, B) for kw in prefix.kwargs[start:]]
    # the rows of each layer from the stacked depths, not the handle's bands
    logits = run_layers(handle, _stacked_state(handle, prefix, states), prefix.hidden[start].repeat(V, 1, 1), start,
                        kwargs, fresh_rows=True)
    return logits.reshape(V, B, -1)


def _tiled_kwargs(kwargs: dict, times: int, rows: int) -> dict:
    """One layer's keyword arguments for ``times`` stacked copies of its ``rows`` rows."""
    out = dict(kwargs)
    if "position_embeddings" in out:
        out["position_embeddings"] = _tiled(out["position_embeddings"], times, rows)
    return out


def mlp_token_layers(states: list[CandidateState], start: int, num_layers: int) -> int:
    """Token rows the MLP processes in layers ``start..L-1`` over every candidate (the work a
    batched replay does, whatever the number of layer calls)."""
    total = 0
    for c in states:
        d = c.depths["mlp"]
        total += int(torch.clamp(d - start, min=0, max=num_layers - start).sum())
    return total
