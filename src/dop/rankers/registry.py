"""The ranker registry (a leaf: it needs the ranker contract of :mod:`.base` only). A ranker
is a registered name, a :class:`Ranker` instance, or any callable
``fn(ctx: RankContext) -> list[permutation]`` (one permutation per image)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import RankContext, Ranker, check_permutation

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


def resolve_for_model(ranker: Any, num_layers: int, **options) -> Ranker:
    """:func:`resolve_ranker`, with parameters that default to a share of the model's depth
    (PyramidDrop's stage layers: the quarter points) fixed for ``num_layers`` layers."""
    r = resolve_ranker(ranker, **options)
    bind = getattr(r, "bind", None)
    if callable(bind):
        bind(int(num_layers))
    return r


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
