"""The pruning runtime against the slow masked reference (docs/design.md, "What skipping means")."""

from __future__ import annotations

import random

import pytest
import torch

from transformers import DynamicCache

import dop
from dop.models import get_adapter
from dop.runtime.cache import MISSING
from reference import masked_reference, reference_greedy
from tiny_models import FAMILIES, build_inputs, build_model, with_cache

ATTN = ("sdpa", "eager")
KIND_SETS = [("attn", "mlp"), ("attn_q", "attn_kv", "mlp"), ("attn_q",), ("attn_kv",), ("mlp",),
             ("attn_q", "mlp"), ("attn_kv", "mlp")]


def random_policy(rng: random.Random, L: int, kinds=None) -> dict:
    G = rng.randint(1, 3)
    groups = sorted(rng.sample([0.125, 0.25, 0.4, 0.5, 0.75], G - 1)) + [1.0]
    kinds = kinds or rng.choice(KIND_SETS)
    return {"format": "dop-policy/1", "num_layers": L, "groups": groups,
            "depth": {k: [rng.randint(0, L) for _ in groups] for k in kinds}}


SKIP_CASES = ("attn", "attn_q", "attn_kv", "mlp", "shortv", "gsop")


def random_skip_policy(rng: random.Random, L: int, case: str) -> dict:
    """A policy with per-layer skips (docs/design.md, "Per-layer skips"): one op kind alone with
    holes; ShortV-like (attn_q and mlp skipped at chosen layers, attn_kv kept, one group); or
    GSOP-like (holes per group and kind, the shallow ranks kept densest)."""
    if case == "shortv":
        layers = sorted(rng.sample(range(L), rng.randint(1, L - 1)))
        return {"format": "dop-policy/2", "num_layers": L, "groups": [1.0], "depth": {},
                "skip": {"attn_q": [layers], "mlp": [layers]}}
    pd = random_policy(rng, L, (case,) if case != "gsop" else ("attn_q", "attn_kv", "mlp"))
    pd["depth"] = {k: [max(d, L - 1) if g == 0 else d for g, d in enumerate(ds)] for k, ds in pd["depth"].items()}
    holes = {k: [sorted(rng.sample(range(d), rng.randint(g == 0, max(d - 1, 0)))) for g, d in enumerate(ds)]
             for k, ds in pd["depth"].items()}
    return dict(pd, format="dop-policy/2", skip=holes)


def _double(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ATTN], ids=lambda p: f"{p[0]}-{p[1]}")
def setup64(request):
    fam, attn = request.param
    model = build_model(fam, attn=attn).double()
    inputs, counts = build_inputs(model, fam, num_images=2)
    return fam, model, _double(inputs), counts


def _perms(counts, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).tolist() for n in counts]


def _against_reference(model, inputs, counts, pd: dict, perms, new_tokens: int = 5) -> tuple[float, torch.Tensor]:
    """Prefill logits of the runtime vs the masked reference (largest difference, returned with
    the reference logits); greedy decoding of ``new_tokens`` must match token for token."""
    adapter = get_adapter(model)
    with masked_reference(model, adapter.decoder_layers(), adapter.entry_module(),
                          adapter.image_token_id, pd, counts, perms):
        ref = model(**inputs, use_cache=False).logits
        ref_tokens = reference_greedy(model, inputs, new_tokens)
    with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, -new_tokens:].tolist()
    assert gen == ref_tokens, f"policy {pd}: greedy {gen} != reference {ref_tokens}"
    return (out - ref).abs().max().item(), ref


@torch.no_grad()
def test_pruned_equals_masked_reference(setup64):
    """Prefill logits to 1e-6 and greedy decoding token for token, random policies of every op kind."""
    fam, model, inputs, counts = setup64
    adapter = get_adapter(model)
    rng = random.Random(sum(map(ord, fam)))
    vanilla = model(**inputs).logits
    worst, moved = 0.0, 0.0
    for trial, kinds in enumerate(KIND_SETS):
        pd = random_policy(rng, adapter.num_layers, kinds)
        diff, ref = _against_reference(model, inputs, counts, pd, _perms(counts, trial))
        worst = max(worst, diff)
        moved = max(moved, (ref - vanilla).abs().max().item())
        assert diff < 1e-6, f"{fam} policy {pd}: max |logit diff| {diff:.3g}"
    assert moved > 1e-2, "the reference policies should change the logits, else the check is empty"
    print(f"{fam}: largest logit difference vs reference {worst:.3g} (policies move logits by up to {moved:.3g})")


@pytest.mark.parametrize("case", SKIP_CASES)
@torch.no_grad()
def test_per_layer_skips_equal_masked_reference(setup64, case):
    """Policies that skip ops at chosen layers (format 2) against the masked reference, as above."""
    fam, model, inputs, counts = setup64
    L = get_adapter(model).num_layers
    rng = random.Random(f"{fam}-{case}")
    vanilla = model(**inputs).logits
    for trial in range(2):
        pd = random_skip_policy(rng, L, case)
        assert dop.Policy.from_dict(pd).skip, f"the {case} policy should keep some skip: {pd}"
        diff, ref = _against_reference(model, inputs, counts, pd, _perms(counts, trial))
        assert diff < 1e-6, f"{fam} {case} policy {pd}: max |logit diff| {diff:.3g}"
        assert (ref - vanilla).abs().max().item() > 1e-3, f"{case} policy {pd} should move the logits"


@torch.no_grad()
def test_pruning_changes_output(setup64):
    """The reference check above is only meaningful if pruning moves the logits."""
    fam, model, inputs, counts = setup64
    L = get_adapter(model).num_layers
    vanilla = model(**inputs).logits
    pol = dop.Policy(L, [0.5, 1.0], {"attn": [L, 1], "mlp": [L, 0]})
    with dop.apply_policy(model, pol, ranker="random"):
        pruned = model(**inputs).logits
    assert (pruned - vanilla).abs().max().item() > 1e-3


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_full_depth_is_exact_and_restored(fam):
    model = build_model(fam)
    inputs, _ = build_inputs(model, fam, num_images=2)
    adapter = get_adapter(model)
    layers_before = list(adapter.decoder_layers())
    vanilla = model(**inputs).logits
    gen_vanilla = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    L = adapter.num_layers
    full = dop.Policy(L, [0.25, 1.0], {"attn_q": [L, L], "attn_kv": [L, L], "mlp": [L, L]})
    with dop.apply_policy(model, full, ranker="random") as handle:
        assert handle.active
        assert torch.equal(model(**inputs).logits, vanilla)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_vanilla)
    assert not handle.active
    assert all(a is b for a, b in zip(adapter.decoder_layers(), layers_before))
    assert not adapter.entry_module()._forward_pre_hooks
    # a pruned policy, removed explicitly, also restores the exact outputs
    h = dop.apply_policy(model, dop.Policy(L, [0.5, 1.0], {"attn": [L, 0], "mlp": [L, 0]}))
    assert not torch.equal(model(**inputs).logits, vanilla)
    h.remove()
    assert torch.equal(model(**inputs).logits, vanilla)
    assert all(a is b for a, b in zip(adapter.decoder_layers(), layers_before))


CACHE_METHODS = ("get_seq_length", "get_mask_sizes", "reorder_cache", "batch_select_indices",
                 "batch_repeat_interleave", "crop")


def _cache_as_made(cache) -> bool:
    """No method of the cache set on its instance, no dop record: every method is its class's."""
    return (not any(name in vars(cache) for name in (*CACHE_METHODS, "_dop_record", "_dop_originals"))
            and all(getattr(cache, name).__func__ is getattr(type(cache), name) for name in CACHE_METHODS))


def _model_state(model) -> tuple:
    """What a policy sets on the model: instance forwards of the decoder layers, hooks of the entry module."""
    adapter = get_adapter(model)
    entry = adapter.entry_module()
    return (tuple("forward" in vars(layer) for layer in adapter.decoder_layers()),
            tuple(entry._forward_pre_hooks), tuple(entry._forward_hooks))


@torch.no_grad()
def test_remove_restores_the_caches_it_ran_with():
    model = build_model("llava")
    inputs, _ = build_inputs(model, "llava")
    L = get_adapter(model).num_layers
    with dop.apply_policy(model, dop.Policy(L, [0.5, 1.0], {"attn": [L, 1], "mlp": [L, 1]})):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        assert not _cache_as_made(out.past_key_values)  # the lengths answer the logical sequence
    assert _cache_as_made(out.past_key_values)


@pytest.mark.parametrize("first_out", ["a", "b"])
@torch.no_grad()
def test_two_handles_on_one_cache_remove_in_either_order(first_out):
    """Two handles (two models) run with one cache: the second takes the cache over and wraps its
    own methods, not the first handle's wrappers; removing both, in either order, leaves the
    cache and both models as they were."""
    model_a, model_b = build_model("llava", seed=0), build_model("llava", seed=1)
    inputs, _ = build_inputs(model_a, "llava")
    L = get_adapter(model_a).num_layers
    policy = dop.Policy(L, [0.5, 1.0], {"attn_q": [L, 1], "mlp": [L, 1]})  # every key kept: b can go on
    states = {m: _model_state(m) for m in (model_a, model_b)}
    cache = DynamicCache(config=model_a.config)
    handles = {"a": dop.apply_policy(model_a, policy), "b": dop.apply_policy(model_b, policy)}
    logits = model_a(**inputs, **with_cache(model_a, cache), use_cache=True).logits
    wrapped_by_a = vars(cache)["get_seq_length"]
    step = {"input_ids": logits[:, -1:].argmax(-1),
            "attention_mask": torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
    model_b(**step, **with_cache(model_b, cache), use_cache=True)
    assert vars(cache)["get_seq_length"] is not wrapped_by_a
    assert set(vars(cache)["_dop_originals"]) == set(CACHE_METHODS)
    assert all(before is MISSING for before in vars(cache)["_dop_originals"].values())  # the class's own
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 1

    handles[first_out].remove()
    assert _cache_as_made(cache) == (first_out == "b")  # b holds the cache until b is removed
    handles["b" if first_out == "a" else "a"].remove()
    assert _cache_as_made(cache)
    assert {m: _model_state(m) for m in (model_a, model_b)} == states


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_kv_cache_holds_only_computed_entries(fam):
    model = build_model(fam)
    inputs, counts = build_inputs(model, fam, num_images=2)
    L = get_adapter(model).num_layers
    n_img = sum(counts)
    S = inputs["input_ids"].shape[1]
    depth_only = dop.Policy(L, [0.25, 0.5, 1.0], {"attn_kv": [L, 2, 0], "attn_q": [1, 1, 1], "mlp": [L, 3, 1]})
    # a skipped attn_kv layer holds no entry for the token, below its depth too
    for pol in (depth_only, depth_only.with_skip(attn_kv=[[1, 3], [0], []])):
        with dop.apply_policy(model, pol, ranker="spatial"):
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        for layer in range(L):
            kept = sum(pol.tokens_processed("attn_kv", layer, n) for n in counts)
            expected = S - n_img + kept + 2  # the last generated token is not fed back yet
            assert cache.layers[layer].keys.shape[-2] == expected, f"{pol}: layer {layer}"


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_sampling_generation_and_bypass(fam):
    model = build_model(fam)
    inputs, _ = build_inputs(model, fam, num_images=1)
    L = get_adapter(model).num_layers
    vanilla = model(**inputs).logits
    with dop.apply_policy(model, dop.Policy.token_pruning(L, 0.25), ranker="random") as handle:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        with handle.bypass():
            assert torch.equal(model(**inputs).logits, vanilla)
        assert not torch.equal(model(**inputs).logits, vanilla)


@torch.no_grad()
def test_prompt_without_images_runs_unpruned():
    model = build_model("llava")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    vanilla = model(input_ids=ids).logits
    with dop.apply_policy(model, dop.Policy.token_pruning(4, 0.1)):
        assert torch.equal(model(input_ids=ids).logits, vanilla)
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("bad,match", [
    (lambda ctx: [list(range(n - 1)) for n in ctx.counts], "permutation"),
    (lambda ctx: [[0] * n for n in ctx.counts], "permutation"),
    (lambda ctx: [list(range(n)) for n in ctx.counts][:1], "one permutation per image"),
])
def test_callable_ranker_must_return_permutations(bad, match):
    model = build_model("llava")
    inputs, _ = build_inputs(model, "llava", num_images=2)
    with dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5), ranker=bad):
        with pytest.raises(ValueError, match=match):
            model(**inputs)


def test_errors_on_apply():
    model = build_model("llava")
    with pytest.raises(dop.PolicyError, match="num_layers"):
        dop.apply_policy(model, dop.Policy.token_pruning(8, 0.5))
    with pytest.raises(ValueError, match="unknown ranker"):
        dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5), ranker="nope")
    with dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5)):
        with pytest.raises(ValueError, match="already applied"):
            dop.apply_policy(model, dop.Policy.token_pruning(4, 0.5))
    # transfer on request
    with dop.apply_policy(model, dop.Policy.token_pruning(8, 0.5, depth=4), transfer=True) as h:
        assert h.policy.num_layers == 4 and h.policy.depth["attn"] == (4, 2)


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_saved_and_reloaded_model_runs_pruned(fam, tmp_path):
    from dop.models import model_class_for

    model = build_model(fam)
    inputs, _ = build_inputs(model, fam)
    model.save_pretrained(tmp_path)
    loaded = model_class_for(model.config).from_pretrained(tmp_path).eval()
    L = get_adapter(loaded).num_layers
    pol = dop.Policy(L, [0.5, 1.0], {"attn": [L, 1], "mlp": [L, 1]})
    with dop.apply_policy(model, pol, ranker="spatial"):
        a = model(**inputs).logits
    with dop.apply_policy(loaded, pol, ranker="spatial"):
        b = loaded(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_images_are_ranked_and_grouped_on_their_own(fam):
    model = build_model(fam)
    inputs, counts = build_inputs(model, fam, num_images=2)
    seen = {}

    def spy(ctx):
        seen["counts"] = ctx.counts
        seen["keep"] = ctx.n_keep
        return [torch.arange(n) for n in ctx.counts]

    pol = dop.Policy(4, [0.25, 1.0], {"attn": [4, 0], "mlp": [4, 0]})
    with torch.no_grad(), dop.apply_policy(model, pol, ranker=spy):
        model(**inputs)
    assert seen["counts"] == counts
    assert seen["keep"] == [int(0.25 * n + 1e-9) for n in counts]


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_replay_from_a_layer_below_every_skip(fam):
    """Early start (dop.runtime.replay) under per-layer skips: a policy whose first skip is at or
    past ``start`` replays to the full forward's logits; one that skips below it is refused."""
    from dop.runtime.replay import capture_prefix, capture_ranks, last_logits, replay_from

    model = build_model(fam).double()
    inputs, _ = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    L = get_adapter(model).num_layers
    groups = [0.5, 1.0]
    pol = dop.Policy(L, groups, {"attn_q": [L, 3]}, skip={"mlp": [[2], [2, 3]], "attn_kv": [[3], [2]]})
    prefix = capture_prefix(model, inputs)
    ranks = capture_ranks(model, inputs, "random:seed=3", groups)
    with dop.apply_policy(model, pol, ranker="random:seed=3") as handle:
        full = last_logits(model, inputs)
        fast = replay_from(handle, prefix, ranks, start=2)[0]
        assert (fast - full).abs().max().item() < 1e-6
        assert (full - prefix.logits[0]).abs().max().item() > 1e-3
        with pytest.raises(ValueError, match="skips an op from layer 2, below start=3"):
            replay_from(handle, prefix, ranks, start=3)
