"""`apply_policy`: make a loaded MLLM skip the operations a policy prunes.

    with apply_policy(model, policy, ranker="vispruner") as handle:
        out = model.generate(**inputs)
        with handle.bypass():          # the unpruned model, same object
            ref = model(**inputs)

Leaving the block (or ``handle.remove()``) puts the original decoder layers back, and the
methods of every KV cache the policy ran with.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..models import get_adapter
from ..models.prefix import decoder_input
from ..names import loaded_model_name, same_model
from ..policy import ModelMismatchWarning, Policy
from ..rankers import RankContext, Ranker, resolve_for_model, run_ranker
from .layer import is_patched, patch_layer, unpatch_layer
from .session import PruneSession


class PolicyHandle:
    """The result of :func:`apply_policy`; a context manager. ``remove()`` undoes it."""

    def __init__(self, model, adapter, policy: Policy, ranker):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.ranker = ranker
        self.session = PruneSession(model, adapter, policy, ranker)
        self._layers = list(adapter.decoder_layers())
        self._hook = None
        self._active = False
        self._ranker_installed = False
        self._install()

    def _install(self) -> None:
        if any(is_patched(layer) for layer in self._layers):
            raise ValueError("a policy is already applied to this model; remove() it first")
        try:
            self.ranker.install(self.model, self.adapter)
            self._ranker_installed = True
            entry = self.adapter.entry_module()
            self._hook = entry.register_forward_pre_hook(self.session.pre_forward, with_kwargs=True)
            self._post = entry.register_forward_hook(self.session.post_forward)
            for i, layer in enumerate(self._layers):
                patch_layer(layer, i, self.session)
        except Exception:
            self.remove()
            raise
        self._active = True

    def remove(self) -> None:
        """Restore the model exactly: the layers' own forward, no hooks, the ranker uninstalled,
        and the methods of every KV cache the policy ran with (docs/design.md, "KV cache")."""
        for layer in self._layers:
            unpatch_layer(layer)
        for name in ("_hook", "_post"):
            hook = getattr(self, name, None)
            if hook is not None:
                hook.remove()
                setattr(self, name, None)
        if self._ranker_installed:
            self.ranker.uninstall()
            self._ranker_installed = False
        self.session.release_caches()
        self._active = False
        self.session.current = None

    @property
    def active(self) -> bool:
        return self._active

    @contextlib.contextmanager
    def bypass(self):
        """Run the unpruned model inside this block (for reference distributions)."""
        prev = self.session.bypass
        self.session.bypass = True
        try:
            yield self
        finally:
            self.session.bypass = prev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<PolicyHandle {state} layers={len(self._layers)} ranker={self.ranker.name!r}>"


def apply_policy(model, policy: Policy | str, ranker=None, *, transfer: bool = False) -> PolicyHandle:
    """Apply ``policy`` to ``model`` in place; returns a handle (also a context manager).

    ``ranker`` is a registered name, a :class:`dop.rankers.Ranker`, or a callable
    ``fn(ctx) -> list[permutation]``; it defaults to the policy's own ``ranker`` field,
    else ``identity`` (:meth:`Policy.ranker_or`). A policy for another depth is an error
    unless ``transfer=True``; a policy recorded for another model
    (``policy.meta["model"]`` against ``config.name_or_path``) warns
    (:class:`dop.policy.ModelMismatchWarning`).
    """
    if isinstance(policy, str):
        policy = Policy.from_json(policy)
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a dop.Policy or a path to a policy file, got {type(policy).__name__}")
    adapter = get_adapter(model)
    policy = policy.check_layers(adapter.num_layers, transfer=transfer)
    _warn_other_model(policy, model)
    r = resolve_for_model(policy.ranker_or(ranker), adapter.num_layers)
    return PolicyHandle(model, adapter, policy, r)


def _warn_other_model(policy: Policy, model) -> None:
    """Warn when the policy records the model it was searched on and the model says where it
    was loaded from, and the two differ (a policy is searched for one model)."""
    searched, loaded = policy.meta.get("model"), loaded_model_name(model)
    if isinstance(searched, str) and searched.strip() and loaded and not same_model(searched, loaded):
        warnings.warn(ModelMismatchWarning(
            f"the policy was searched on {searched!r} but is applied to {loaded!r}; its depths "
            "may not suit this model"), stacklevel=3)


def rank_visual_tokens(model, inputs: dict, ranker, n_keep: int | list[int] | None = None) -> list[list[int]]:
    """Rank the visual tokens of ``inputs`` (batch of 1) with ``ranker``; per image, a
    permutation (token indices in order of importance). For set-based rankers the first
    ``n_keep`` ranks are the method's selection at that budget."""
    adapter = get_adapter(model)
    r = resolve_for_model(ranker, adapter.num_layers)
    return [p.tolist() for p in rank_prompt(model, adapter, r, inputs, n_keep)]


def rank_prompt(model, adapter, ranker: Ranker, inputs: dict, n_keep=None) -> list[torch.Tensor]:
    """Rank the visual tokens of one prompt outside of a pruned forward; a ranker whose ranks
    come from its own pruned forward (``standalone_policy``: PyramidDrop) runs under it."""
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"rank_visual_tokens takes one prompt (batch size 1), got {input_ids.shape[0]}")
    policy = ranker.standalone_policy(adapter.num_layers)
    if policy is not None:
        args = {k: v for k, v in inputs.items() if k != "use_cache"}
        with torch.no_grad(), apply_policy(model, policy, ranker=ranker) as handle:
            model(**args, use_cache=False)
            return [p.clone() for p in handle.session.current.ranks]
    spans = adapter.image_spans(input_ids, inputs)
    if n_keep is None:
        keeps = [s.n for s in spans]
    elif isinstance(n_keep, int):
        keeps = [min(n_keep, s.n) for s in spans]
    else:
        keeps = list(n_keep)
    ctx = RankContext(model, adapter, dict(inputs), spans, decoder_input(model, inputs, adapter), keeps)
    return run_ranker(ranker, ctx)


__all__ = ["PolicyHandle", "apply_policy", "rank_prompt", "rank_visual_tokens"]
