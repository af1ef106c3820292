"""Baselines as policies (issue 4, item 3): budgets, FLOPs, CLI, and the pruned forward of
each baseline against the masked reference given the ranking it used."""

from __future__ import annotations

import json

import pytest
import torch

import dop
from dop import baselines as B
from dop.baselines.common import arch_of
from dop.cli import main
from dop.flops import budget_from_tokens, count_flops
from dop.models import get_adapter
from reference import masked_reference
from tiny_models import FAMILIES, build_inputs, build_model

PRE_LLM = ("vispruner", "cdpruner", "random", "spatial")
IN_LLM = ("fastv", "dart", "pdrop")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny64(request):
    fam = request.param
    model = build_model(fam, num_layers=4).double()
    inputs, counts = build_inputs(model, fam, num_images=2)
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    return fam, model, inputs, counts


def _policy(method, model):
    if method == "pdrop":
        return B.pdrop(model.config, ratio=0.5, layers=(1, 2, 3))
    if method in ("fastv", "dart"):
        return B.baseline(method, model.config, tokens=5, K=2)
    return B.baseline(method, model.config, tokens=5)


@pytest.mark.parametrize("method", PRE_LLM + IN_LLM)
@torch.no_grad()
def test_baseline_forward_equals_masked_reference(tiny64, method):
    fam, model, inputs, counts = tiny64
    adapter = get_adapter(model)
    policy, spec = _policy(method, model)
    assert policy.ranker == spec
    with dop.apply_policy(model, policy) as h:  # the policy's own ranker
        out = model(**inputs, use_cache=False).logits
        used = [r.tolist() for r in h.session.current.ranks]
    if method in PRE_LLM:  # the ranking is the ranker's at the policy's kept count
        assert used == dop.rank_visual_tokens(model, inputs, spec, [policy.n_keep(n) for n in counts])
    with masked_reference(model, adapter.decoder_layers(), adapter.entry_module(), adapter.image_token_id,
                          policy.to_dict(), counts, used):
        ref = model(**inputs, use_cache=False).logits
    diff = (out - ref).abs().max().item()
    assert diff < 1e-6, f"{fam} {method}: max |logit diff| {diff:.3g}"


def test_shapes_of_the_policies():
    L = 32
    p, spec = B.vispruner("llava-1.5-7b", tokens=64)
    assert (p.groups, p.depth, spec) == ((64 / 576, 1.0), {"attn": (L, 0), "mlp": (L, 0)}, "vispruner")
    assert p.n_keep(576) == 64 and p.meta["kept_tokens"] == 64
    p, spec = B.fastv("llava-1.5-7b", tokens=288, K=3)
    assert p.depth == {"attn": (L, 3), "mlp": (L, 3)} and spec == "fastv:K=3"
    assert p.tokens_processed("mlp", 2, 576) == 576 and p.tokens_processed("mlp", 3, 576) == 288
    p, spec = B.pdrop("llava-1.5-7b", ratio=0.5)
    assert p.groups == (0.125, 0.25, 0.5, 1.0) and p.depth["attn"] == (L, 24, 16, 8)
    assert [p.tokens_processed("attn_q", l, 576) for l in (7, 8, 16, 24)] == [576, 288, 144, 72]
    assert spec == "pdrop:layers=8-16-24,ratio=0.5"
    p, spec = B.dart("llava-1.5-7b", tokens=128)
    assert spec == "dart:K=2" and p.depth["attn"] == (L, 2)
    for k in (0, 1, 575, 576):
        assert B.token_policy(L, 576, k).n_keep(576) == k


@pytest.mark.parametrize("method", ["vispruner", "fastv", "dart", "pdrop"])
@pytest.mark.parametrize("convention", ["paper", "dop"])
def test_budget_is_met_and_tight(method, convention):
    """The solved count (ratio) is the largest whose count_flops fits the budget."""
    for tokens in (64, 128, 192):
        budget = budget_from_tokens("llava-1.5-7b", tokens)
        if convention == "dop":  # the same token count's cost, counted with the text tokens
            budget = B.flops_fraction(arch_of("llava-1.5-7b"), B.token_policy(32, 576, tokens), 576, "dop")
        kw = dict(budget=budget, convention=convention)
        if method == "pdrop":
            kw["layers"] = (2, 6, 12)
        policy, _ = B.baseline(method, "llava-1.5-7b", **kw)
        rep = count_flops("llava-1.5-7b", policy, num_visual_tokens=576, num_text_tokens=64, convention=convention)
        frac = rep.decoder / rep.decoder_unpruned
        assert frac <= budget + 1e-12
        assert policy.meta["flops_fraction"][convention] == pytest.approx(frac, abs=1e-6)
        if method != "pdrop":
            k = policy.meta["kept_tokens"]
            more = B.token_policy(32, 576, k + 1, policy.meta["prune_layer"])
            assert B.flops_fraction(arch_of("llava-1.5-7b"), more, 576, convention) > budget
        if method == "vispruner":
            assert policy.meta["kept_tokens"] == tokens  # pruning before the LLM: the budget's own count
        if method == "fastv":
            assert policy.meta["kept_tokens"] < tokens  # two full layers cost extra


def test_errors():
    with pytest.raises(ValueError, match="exactly one"):
        B.fastv("llava-1.5-7b", tokens=3, budget=0.5)
    with pytest.raises(ValueError, match="below what PDrop costs"):
        B.pdrop("llava-1.5-7b", budget=0.11)
    with pytest.raises(ValueError, match="ratio"):
        B.pdrop("llava-1.5-7b", tokens=64)
    with pytest.raises(ValueError, match="K"):
        B.fastv("llava-1.5-7b", tokens=3, K=32)
    with pytest.raises(ValueError, match="unknown baseline"):
        B.baseline("tome", "llava-1.5-7b", tokens=3)
    with pytest.raises(ValueError, match="tokens"):
        B.spatial("llava-1.5-7b", tokens=600)


def test_cli_writes_a_policy(tmp_path, capsys):
    out = tmp_path / "fastv.json"
    assert main(["baseline", "fastv", "--model", "llava-1.5-7b", "--budget-tokens", "64", "-o", str(out)]) == 0
    pol = dop.Policy.from_json(str(out))
    assert pol.ranker == "fastv:K=2" and pol.meta["budget_tokens"] == 64 and pol.meta["method"] == "fastv"
    assert "fastv" in capsys.readouterr().out
    out2 = tmp_path / "pdrop.json"
    assert main(["baseline", "pdrop", "--model", "qwen2.5-vl-7b", "--ratio", "0.5", "--layers", "7-14-21",
                 "-o", str(out2)]) == 0
    data = json.loads(out2.read_text())
    assert data["ranker"] == "pdrop:layers=7-14-21,ratio=0.5" and data["num_layers"] == 28
    assert main(["baseline", "pdrop", "--model", "llava-1.5-7b", "--tokens", "64", "-o", str(out2)]) == 2
    assert main(["baseline", "spatial", "--model", "nope-model", "--tokens", "4", "-o", str(out2)]) == 2
    assert "dop: error" in capsys.readouterr().err


def test_policy_from_a_checkpoint_folder(tmp_path):
    """A saved tiny model's folder gives the policy from its config alone."""
    model = build_model("llava", num_layers=4)
    model.config.save_pretrained(tmp_path)
    policy, spec = B.fastv(str(tmp_path), tokens=4, K=1)
    assert policy.num_layers == 4 and policy.n_keep(16) == 16 and policy.tokens_processed("attn_q", 1, 16) == 4
