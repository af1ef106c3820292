"""Ranker registry. A ranker is a registered name, a :class:`Ranker` instance, or any
callable ``fn(ctx: RankContext) -> list[permutation]`` (one permutation per image)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import LayerState, RankContext, Ranker, check_permutation

_RANKERS: dict[str, type[Ranker]] = {}


def register_ranker(cls: type[Ranker]) -> type[Ranker]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _RANKERS:
        raise ValueError(f"a ranker named {cls.name!r} is already registered")
    _RANKERS[cls.name] = cls
    return cls


def known_rankers() -> list[str]:
    return sorted(_RANKERS)


class _CallableRanker(Ranker):
    name = "callable"

    def __init__(self, fn: Callable):
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def rank(self, ctx):
        return self.fn(ctx)


def resolve_ranker(ranker: Any, **options) -> Ranker:
    """A Ranker instance from a name (``"random"``, ``"random:seed=3"``), instance or callable."""
    if ranker is None:
        ranker = "identity"
    if isinstance(ranker, Ranker):
        return ranker
    if isinstance(ranker, str):
        name, _, opts = ranker.partition(":")
        if name not in _RANKERS:
            raise ValueError(f"unknown ranker {name!r}; known rankers: {', '.join(known_rankers())}")
        kwargs = dict(options)
        for item in filter(None, opts.split(",")):
            key, eq, val = item.partition("=")
            if not eq:
                raise ValueError(f"ranker options must be key=value, got {item!r} in {ranker!r}")
            try:
                kwargs[key] = type(_number(val))(_number(val))
            except ValueError:
                kwargs[key] = val
        try:
            return _RANKERS[name](**kwargs)
        except TypeError as e:
            raise ValueError(f"ranker {name!r}: bad options {kwargs} ({e})") from None
    if callable(ranker):
        return _CallableRanker(ranker)
    raise ValueError(f"ranker must be a name, a Ranker or a callable, got {type(ranker).__name__}")


def _number(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    raise ValueError(text)


def run_ranker(ranker: Ranker, ctx: RankContext) -> list[torch.Tensor]:
    """Call ``ranker.rank`` and check it returns one permutation per image."""
    perms = ranker.rank(ctx)
    if perms is None or len(perms) != len(ctx.spans):
        got = "None" if perms is None else f"{len(perms)}"
        raise ValueError(f"ranker {ranker.name!r} must return one permutation per image: {len(ctx.spans)} expected, got {got}")
    return [check_permutation(p, s.n, f"ranker {ranker.name!r}, image {i}") for i, (p, s) in enumerate(zip(perms, ctx.spans))]


def rank_visual_tokens(model, inputs: dict, ranker: Any, n_keep: int | list[int] | None = None) -> list[list[int]]:
    """Rank the visual tokens of ``inputs`` (batch of 1) with ``ranker``; per image, a
    permutation (token indices in order of importance). For set-based rankers the first
    ``n_keep`` ranks are the method's selection at that budget."""
    from ..models import get_adapter
    from ..runtime.session import rank_prompt

    adapter = get_adapter(model)
    r = resolve_ranker(ranker)
    return [p.tolist() for p in rank_prompt(model, adapter, r, inputs, n_keep)]


from . import basic, cdpruner, dart, fastv, pdrop, vispruner  # noqa: E402,F401  (registration)

__all__ = [
    "LayerState", "RankContext", "Ranker", "check_permutation", "known_rankers",
    "rank_visual_tokens", "register_ranker", "resolve_ranker", "run_ranker",
]
