"""apply_policy and the policy's recorded model; a failed install leaves nothing behind (issue 15)."""

from __future__ import annotations

import warnings

import pytest
import torch

import dop
from dop.models import get_adapter
from dop.policy import ModelMismatchWarning
from dop.rankers.base import Ranker
from dop.runtime.layer import is_patched
from tiny_models import build_inputs, build_model


def _applied(model, policy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dop.apply_policy(model, policy):
            pass
    return [w for w in caught if issubclass(w.category, ModelMismatchWarning)]


def test_apply_warns_for_another_model(tmp_path):
    model = build_model("llava")
    model.config._name_or_path = "org/model-a"
    pol = dop.Policy.token_pruning(4, 0.5)
    (hit,) = _applied(model, pol.with_meta(model="org/model-b"))
    assert "'org/model-b'" in str(hit.message) and "'org/model-a'" in str(hit.message)
    assert _applied(model, pol.with_meta(model="Org/Model-A")) == []  # hub ids ignore case
    assert _applied(model, pol) == []  # the policy does not say: nothing to compare
    model.config._name_or_path = ""
    assert _applied(model, pol.with_meta(model="org/model-b")) == []  # the model does not say
    model.config._name_or_path = str(tmp_path)
    assert _applied(model, pol.with_meta(model=str(tmp_path / "." ))) == []  # one folder, two spellings


@torch.no_grad()
def test_policy_saved_with_a_checkpoint_applies_to_it(tmp_path):
    from dop.models import model_class_for

    model = build_model("llava")
    inputs, _ = build_inputs(model, "llava")
    pol = dop.Policy(4, [0.5, 1.0], {"attn": [4, 1], "mlp": [4, 1]}, ranker="spatial", meta={"model": str(tmp_path)})
    model.save_pretrained(tmp_path)
    pol.save_pretrained(tmp_path)
    loaded = model_class_for(model.config).from_pretrained(tmp_path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        with dop.apply_policy(loaded, dop.Policy.from_pretrained(tmp_path)) as h:
            assert h.ranker.name == "spatial"
            b = loaded(**inputs).logits
    with dop.apply_policy(model, pol):
        a = model(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)


class _Recording(Ranker):
    name = "recording"

    def __init__(self):
        self.installed = 0

    def rank(self, ctx):
        return [torch.arange(n) for n in ctx.counts]

    def install(self, model, adapter):
        self.installed += 1

    def uninstall(self):
        self.installed -= 1


def test_failed_install_leaves_nothing_installed(monkeypatch):
    model = build_model("llava")
    adapter = get_adapter(model)
    layers = list(adapter.decoder_layers())
    from dop.runtime import layer as layer_mod

    real, calls = layer_mod.patch_layer, []

    def patch_then_fail(layer, i, session):
        calls.append(i)
        if i == 2:
            raise RuntimeError("boom")
        real(layer, i, session)

    monkeypatch.setattr("dop.runtime.patch_layer", patch_then_fail)
    ranker = _Recording()
    entry = adapter.entry_module()
    before = (dict(entry._forward_pre_hooks), dict(entry._forward_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5), ranker=ranker)
    assert calls == [0, 1, 2] and ranker.installed == 0
    assert not any(is_patched(layer) for layer in layers)
    assert (dict(entry._forward_pre_hooks), dict(entry._forward_hooks)) == before
    monkeypatch.undo()
    with dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5), ranker=ranker):  # and it applies again
        assert ranker.installed == 1
    assert ranker.installed == 0
