"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967).

The kept set of ``n_keep`` tokens is the greedy MAP of a conditional DPP with kernel

    L = diag(r) S diag(r)

- ``S``: cosine similarity of the projected visual tokens of the image (the decoder's input at
  its visual positions).
- ``r``: relevance of each token to the instruction. The instruction embedding is the LLM's
  own input embedding of the prompt's text tokens (every non-visual token of the prompt, so
  it works for every family); a user-supplied CLIP text tower is not wired in yet.
  ``rel_i = sign * mean_j cos(v_i, t_j)``, min-max normalised over the image's tokens to
  [0, 1] (``(rel - min) / (max - min + 1e-6)``), then ``r = exp(alpha * rel)`` with
  ``alpha = theta / (2 (1 - theta))`` (``theta = 0.5`` gives ``alpha = 0.5``, the published
  default; ``theta = 1`` keeps ``r = rel``).

**Sign.** The public reference code computes ``relevance = (-relevance).mean(dim=-1)``: it
negates the cosine similarity between CLIP *patch* embeddings and the CLIP text embedding
before normalising, so tokens *less* similar to the text get the larger weight. This
compensates a known property of CLIP's patch tokens (their similarity to the text is
inverted relative to the foreground, the "opposite visualisation" of CLIP Surgery): it is
specific to that embedding space. Our relevance is measured in the LLM's input space
between projected visual tokens and the instruction's token embeddings, where no such
inversion is known, so the default is ``sign=1`` (more similar = more relevant);
``cdpruner:sign=-1`` reproduces the reference's convention.

**Greedy MAP** (fast Cholesky-update form of Chen et al. 2018): each step adds the token with
the largest conditional gain, i.e. the largest increase of ``log det L_S``.

Ranks: the greedy selection in the order it was picked, then the rest by descending ``r``
(ties: order of appearance). If the kernel's rank runs out before ``n_keep`` (more tokens
than dimensions), the remaining picks follow the same descending-``r`` order.
"""

from __future__ import annotations

import torch

from .registry import register_ranker
from .base import RankContext, Ranker
from .common import greedy_dpp, order_desc, visual_mask


def relevance(visual: torch.Tensor, text: torch.Tensor, sign: float = 1.0, theta: float = 0.5) -> torch.Tensor:
    """(n,) relevance weights ``r`` of visual tokens (n, d) to instruction tokens (m, d)."""
    v = torch.nn.functional.normalize(visual.double(), dim=-1)
    if text.numel() == 0:
        return torch.ones(v.shape[0], dtype=torch.float64, device=v.device)
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    rel = sign * (v @ t.T).mean(-1)
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-6)
    if theta != 1:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel


def conditional_kernel(visual: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    v = torch.nn.functional.normalize(visual.double(), dim=-1)
    return r[:, None] * (v @ v.T) * r[None, :]


def cdpruner_order(visual: torch.Tensor, text: torch.Tensor, n_keep: int, sign: float = 1.0, theta: float = 0.5) -> torch.Tensor:
    n = visual.shape[0]
    r = relevance(visual, text, sign, theta)
    chosen = greedy_dpp(conditional_kernel(visual, r), max(0, min(n, int(n_keep))))
    taken = torch.zeros(n, dtype=torch.bool, device=r.device)
    first = torch.tensor(chosen, dtype=torch.long, device=r.device)
    taken[first] = True
    by_r = order_desc(r)
    return torch.cat([first, by_r[~taken[by_r]]])


@register_ranker
class CDPrunerRanker(Ranker):
    """Conditional-DPP selection of instruction-relevant, mutually diverse tokens."""

    name = "cdpruner"

    def __init__(self, sign: float = 1, theta: float = 0.5):
        if float(sign) not in (1.0, -1.0):
            raise ValueError(f"cdpruner: sign must be 1 or -1, got {sign}")
        if not 0.0 < float(theta) <= 1.0:
            raise ValueError(f"cdpruner: theta must lie in (0, 1], got {theta}")
        self.sign = float(sign)
        self.theta = float(theta)

    def rank(self, ctx: RankContext):
        keeps = ctx.n_keep or [s.n for s in ctx.spans]
        texts = {row: ctx.text_embeddings(row) for row in {s.row for s in ctx.spans}}
        return [cdpruner_order(ctx.image_embeddings(s), texts[s.row], k, self.sign, self.theta)
                for s, k in zip(ctx.spans, keeps)]
