"""Batches under a policy equal the prompts run one by one (docs/design.md, "Batches").

A batch mixes prompts of different lengths and image counts (none included), padded on the
left (as generation wants) or on the right. Each row is ranked and pruned on its own, so the
batched prefill logits at every real position, and greedy generation, equal the single runs.
"""

from __future__ import annotations

import pytest
import torch

import dop
from dop.models import get_adapter
from tiny_models import FAMILIES, build_inputs, build_model, collate, text_only_inputs

ATTN = ("sdpa", "eager")


def _double(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


def _prompts(model, fam):
    a, _ = build_inputs(model, fam, num_images=2, text_len=6, seed=0)
    b = text_only_inputs(text_len=9)
    c, _ = build_inputs(model, fam, num_images=1, text_len=3, seed=3)
    return [_double(p) for p in (a, b, c)]


def _policies(L):
    return [
        dop.Policy(L, [0.25, 0.5, 1.0], {"attn_q": [L, 2, 1], "attn_kv": [L, 1, 0], "mlp": [L, 3, 0]}),
        dop.Policy(L, [0.5, 1.0], {"attn": [L, 1], "mlp": [2, 0]}),
        *_skip_policies(L),
    ]


def _skip_policies(L):
    """Per-layer skips (docs/design.md, "Per-layer skips"): ShortV-like (attn_q and mlp skipped
    at layers 1 and 2, keys kept) and GSOP-like (holes per group and kind, keys included)."""
    return [
        dop.Policy(L, [1.0], {}, skip={"attn_q": [[1, 2]], "mlp": [[1, 2]]}),
        dop.Policy(L, [0.25, 0.5, 1.0], {"attn_q": [L, 3, 2], "attn_kv": [L, 2, 1], "mlp": [L, 3, 1]},
                   skip={"attn_q": [[1], [0, 2], []], "attn_kv": [[2], [0], []], "mlp": [[0, 3], [1], [0]]}),
    ]


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    fam, attn = request.param
    model = build_model(fam, attn=attn).double()
    return fam, model, _prompts(model, fam)


def _real_rows(batch, row, side, n):
    width = batch["input_ids"].shape[1]
    return slice(width - n, width) if side == "left" else slice(0, n)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_batched_prefill_equals_rows_one_by_one(setup, side):
    fam, model, prompts = setup
    L = get_adapter(model).num_layers
    batch = collate(prompts, side)
    worst = 0.0
    for pol in _policies(L):
        with dop.apply_policy(model, pol, ranker="random:seed=1"):
            single = [model(**p).logits[0] for p in prompts]
            batched = model(**batch).logits
        for row, ref in enumerate(single):
            got = batched[row, _real_rows(batch, row, side, ref.shape[0])]
            worst = max(worst, (got - ref).abs().max().item())
    assert worst < 1e-6, f"{fam} {side}: batched vs single max |logit diff| {worst:.3g}"
    moved = max((model(**p).logits[0] - ref).abs().max().item() for p, ref in zip(prompts, single))
    assert moved > 1e-3, "the policy should move the logits, else the check is empty"
    print(f"{fam} {side}: batched vs single {worst:.3g}")


@torch.no_grad()
def test_batched_generation_equals_rows_one_by_one(setup):
    fam, model, prompts = setup
    L = get_adapter(model).num_layers
    batch = collate(prompts, "left")
    for pol in (dop.Policy(L, [0.25, 1.0], {"attn": [L, 0], "mlp": [1, 0]}), *_skip_policies(L)):
        with dop.apply_policy(model, pol, ranker="random:seed=1"):
            single = [model.generate(**p, max_new_tokens=5, do_sample=False)[0, -5:].tolist() for p in prompts]
            batched = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:].tolist()
        assert batched == single, f"{fam} {pol}: batched greedy {batched} != single {single}"


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_batched_in_llm_ranker_equals_rows_one_by_one(fam):
    """FastV decides inside the LLM from the last token's attention: per row, without padding."""
    model = build_model(fam, attn="sdpa").double()
    prompts = _prompts(model, fam)
    L = get_adapter(model).num_layers
    pol = dop.Policy(L, [0.5, 1.0], {"attn": [L, 2], "mlp": [L, 1]})
    batch = collate(prompts, "left")
    # per-layer skips at or past the ranker's layer (FastV K=1 ranks before layer 0)
    for p in (pol, pol.with_skip(mlp=[[1, 3], []], attn_q=[[2], [1]])):
        with dop.apply_policy(model, p, ranker="fastv:K=1"):
            single = [model(**x).logits[0] for x in prompts]
            batched = model(**batch).logits
        for row, ref in enumerate(single):
            got = batched[row, -ref.shape[0]:]
            assert (got - ref).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="ranks inside the LLM at layer 2.*skips some op at layer 1"):
        dop.apply_policy(model, dop.Policy(L, [0.5, 1.0], skip={"mlp": [[1], []]}), ranker="fastv:K=3")


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_beam_search_and_num_return_sequences(fam):
    """Beam search reorders the cache rows; the runtime's per-row entry columns follow."""
    model = build_model(fam, attn="sdpa").double()
    p, _ = build_inputs(model, fam, num_images=1)
    p = _double(p)
    L = get_adapter(model).num_layers
    pol = _policies(L)[1]
    with dop.apply_policy(model, pol, ranker="random:seed=1"):
        beams = model.generate(**p, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
        greedy1 = model.generate(**p, max_new_tokens=4, num_beams=1, do_sample=False)
        beams1 = model.generate(**p, max_new_tokens=4, num_beams=1, num_return_sequences=1, do_sample=False)
    assert beams.shape[0] == 2
    assert torch.equal(greedy1, beams1)


@pytest.mark.parametrize("fam", ["llava", "internvl"])
@torch.no_grad()
def test_packed_sequences_do_not_see_each_other(fam):
    """Padding-free inputs: two prompts packed in one row, position ids restarting at 0. Each
    packed sequence is pruned and attends within itself, as when run alone (found by the
    conformance run: transformers' padding-free tests)."""
    model = build_model(fam, attn="sdpa").double()
    a, _ = build_inputs(model, fam, num_images=2, text_len=6, seed=0)
    c, _ = build_inputs(model, fam, num_images=1, text_len=3, seed=3)
    a, c = _double(a), _double(c)
    L = get_adapter(model).num_layers
    pol = _policies(L)[0]
    la, lc = a["input_ids"].shape[1], c["input_ids"].shape[1]
    packed = {
        "input_ids": torch.cat([a["input_ids"], c["input_ids"]], 1),
        "position_ids": torch.cat([torch.arange(la), torch.arange(lc)])[None],
        "pixel_values": torch.cat([a["pixel_values"], c["pixel_values"]]),
    }
    with dop.apply_policy(model, pol, ranker="spatial"):
        single = [model(**p).logits[0] for p in (a, c)]
        both = model(**packed).logits[0]
    assert (both[:la] - single[0]).abs().max().item() < 1e-6
    assert (both[la:] - single[1]).abs().max().item() < 1e-6
