"""pytest plugin of the conformance run: applies a dop policy to every model of the four
families that a test builds (docs/conformance.md says how it is run and what it found).

    DOP_CONFORMANCE_POLICY=noop|prune|PATH python -m pytest -p dop_conformance ...

- ``noop``: every op at every layer for two rank groups (must change nothing);
- ``prune``: attention and MLP of every visual token skipped from half the depth on;
- ``PATH``: a policy file, its depths rescaled to each model's layer count.

``DOP_CONFORMANCE_RANKER`` picks the ranker (default ``identity``). Without
``DOP_CONFORMANCE_POLICY`` the plugin changes nothing (the plain run loads it too).

The classes' ``__init__`` is wrapped so that the policy is applied when the outermost
constructor returns: the inner ``LlavaModel`` built inside a ``LlavaForConditionalGeneration``
is not wrapped a second time. Every test gets a junit property ``dop_policies_applied``
(models that got a policy during the test), so the runner can tell that the policy was
really in force.
"""

from __future__ import annotations

import functools
import os
import threading

import pytest

POLICY_ENV = "DOP_CONFORMANCE_POLICY"
RANKER_ENV = "DOP_CONFORMANCE_RANKER"
PROPERTY = "dop_policies_applied"

# the multimodal model classes of the four families whose config dop has an adapter for
CLASS_NAMES = (
    "LlavaForConditionalGeneration",
    "LlavaModel",
    "LlavaNextForConditionalGeneration",
    "LlavaNextModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLModel",
    "InternVLForConditionalGeneration",
    "InternVLModel",
)

_state = threading.local()
_applied = {"count": 0}
_wrapped: dict[type, object] = {}


def make_policy(spec: str, num_layers: int):
    """The policy named by ``spec`` (``noop``, ``prune`` or a policy file) for ``num_layers``."""
    from dop import Policy

    L = num_layers
    if spec == "noop":
        return Policy(L, [0.5, 1.0], {"attn_q": [L, L], "attn_kv": [L, L], "mlp": [L, L]})
    if spec == "prune":
        return Policy(L, [1.0], {"attn": [L // 2], "mlp": [L // 2]})
    return Policy.from_json(spec).check_layers(L, transfer=True)


def _depth() -> int:
    return getattr(_state, "depth", 0)


def wrap_class(cls, spec: str, ranker: str) -> None:
    """Make ``cls.__init__`` apply the policy at the end of an outermost construction."""
    if cls in _wrapped:
        return
    original = cls.__init__
    _wrapped[cls] = original

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        outer = _depth() == 0
        _state.depth = _depth() + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _state.depth -= 1
        if outer:
            import dop
            from dop.models import get_adapter

            dop.apply_policy(self, make_policy(spec, get_adapter(self).num_layers), ranker=ranker)
            _applied["count"] += 1

    cls.__init__ = __init__


def unwrap_all() -> None:
    for cls, original in _wrapped.items():
        cls.__init__ = original
    _wrapped.clear()


def install(spec: str, ranker: str = "identity") -> None:
    import transformers

    if spec not in ("noop", "prune") and not os.path.exists(spec):
        raise ValueError(f"{POLICY_ENV}={spec!r}: expected 'noop', 'prune' or a path to a policy file")
    for name in CLASS_NAMES:
        wrap_class(getattr(transformers, name), spec, ranker)


def applied_count() -> int:
    return _applied["count"]


def pytest_configure(config):
    spec = os.environ.get(POLICY_ENV, "").strip()
    if spec:
        install(spec, os.environ.get(RANKER_ENV, "identity"))


def pytest_unconfigure(config):
    unwrap_all()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash_dop_start = applied_count()  # models built from here on count for this test


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    start = getattr(item, "stash_dop_start", applied_count())
    item.user_properties.append((PROPERTY, applied_count() - start))
