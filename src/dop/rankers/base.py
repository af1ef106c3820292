"""The ranker contract.

A ranker orders the visual tokens of each image by importance: it returns, per image, a
permutation of ``range(n_image)`` listing token indices (within the image, in order of
appearance) from most to least important. Rank 0 comes first.

Rankers that decide *inside* the LLM (FastV, PyramidDrop) also declare ``layers``: before
each of those decoder layers the runtime calls :meth:`Ranker.rerank` with that layer's
input state, and the ranker may reorder the visual tokens that every op has processed at
every earlier layer (their state is that of unpruned tokens); the others keep their ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RankContext:
    """Everything a ranker may look at for the prompts of one forward.

    A batch of B prompts is ranked in one call: ``spans`` lists the images of every row in
    order (each span knows its ``row``), and a ranker returns one permutation per span. The
    images of a batch appear in ``spans`` in the order the model consumes their pixels."""

    model: Any  # the transformers model
    adapter: Any  # dop.models.Adapter
    inputs: dict[str, Any]  # the forward's keyword inputs (input_ids, pixel_values, ...)
    spans: list  # list[ImageSpan]: per image, positions of its visual tokens (+ grid, row)
    embeddings: torch.Tensor | None = None  # (B, S, d) the decoder's input (visual tokens projected)
    n_keep: list[int] = field(default_factory=list)  # per image: tokens any op still processes
    present: torch.Tensor | None = None  # (B, S) bool: False at padding; None means no padding

    @property
    def counts(self) -> list[int]:
        return [s.n for s in self.spans]

    def image_embeddings(self, span) -> torch.Tensor:
        """(n, d) the decoder's input at the visual tokens of ``span``."""
        return self.embeddings[span.row].index_select(0, span.positions.to(self.embeddings.device))

    def text_embeddings(self, row: int) -> torch.Tensor:
        """(t, d) the decoder's input at the text tokens of batch row ``row`` (no padding)."""
        emb = self.embeddings[row]
        keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        if self.present is not None:
            keep &= self.present[row].to(emb.device)
        for s in self.spans:
            if s.row == row:
                keep[s.positions.to(emb.device)] = False
        return emb[keep]


@dataclass
class LayerState:
    """What an in-LLM ranker sees at a re-ranking layer."""

    layer_idx: int
    hidden_states: torch.Tensor  # (1, S, d) input of the layer
    parts: Any  # dop.models.LayerParts of the layer: its norm, q/k projections, rotary function
    position_embeddings: Any  # (cos, sin) for all S positions
    active: list[torch.Tensor]  # per image: bool (n,) tokens every op processed at every layer below
    ranks: list[torch.Tensor]  # per image: current permutation (rank -> token index)

    @property
    def layer(self) -> torch.nn.Module:
        """The original decoder layer."""
        return self.parts.layer

    @property
    def rotary_fn(self):
        """The family's ``apply_rotary_pos_emb(q, k, cos, sin)``."""
        return self.parts.rotary


class Ranker:
    """Base class; subclasses set ``name`` and implement :meth:`rank`."""

    name: str = ""
    layers: tuple[int, ...] = ()  # decoder layers before which rerank() is called

    def rank(self, ctx: RankContext) -> list[torch.Tensor]:
        raise NotImplementedError

    def rerank(self, ctx: RankContext, state: LayerState) -> list[torch.Tensor] | None:
        return None

    def standalone_policy(self, num_layers: int):
        """A policy whose pruned forward yields this ranker's ranks when it ranks on its own
        (outside :func:`dop.apply_policy`), or None: :meth:`rank` gives them."""
        return None

    def install(self, model, adapter) -> None:
        """Called once by apply_policy (e.g. to hook the vision tower)."""

    def uninstall(self) -> None:
        """Undo :meth:`install`."""


def rerank_layers(ranker) -> tuple[int, ...]:
    """The decoder layers before which ``ranker`` re-ranks inside the LLM (sorted; empty for a
    ranker that decides before the LLM): the one reading of ``Ranker.layers``."""
    return tuple(sorted(set(int(l) for l in getattr(ranker, "layers", ()) or ())))


def ranks_settled_at(ranker, num_layers: int) -> int:
    """The first layer (at least 1, at most ``num_layers - 1``) from which the ranks of a
    forward that keeps every token active no longer change: one past the last re-ranking
    layer. The search's probe forward stops there (docs/design.md, "Search")."""
    return min(max([0, *rerank_layers(ranker)]) + 1, num_layers - 1)


def check_permutation(perm, n: int, what: str) -> torch.Tensor:
    """Validate and return ``perm`` as a LongTensor permutation of ``range(n)``."""
    try:
        dev = perm.device if isinstance(perm, torch.Tensor) else "cpu"
        t = torch.as_tensor(perm, device=dev).reshape(-1).long()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{what}: expected a permutation of range({n}), got {type(perm).__name__} ({e})") from None
    if t.numel() != n:
        raise ValueError(f"{what}: expected a permutation of range({n}), got {t.numel()} entries")
    seen = torch.zeros(n, dtype=torch.bool, device=t.device)
    if n and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"{what}: entries must lie in [0, {n}); got min {int(t.min())}, max {int(t.max())}")
    seen[t] = True
    if not bool(seen.all()):
        raise ValueError(f"{what}: not a permutation of range({n}) (repeated or missing indices)")
    return t
