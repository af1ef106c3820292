"""Rankers against plain re-computations on tiny models (issue 4, item 4)."""

from __future__ import annotations

import pytest
import torch

import dop
from dop.models import get_adapter
from dop.rankers import RankContext, resolve_ranker
from dop.runtime import rank_visual_tokens
from dop.rankers.cdpruner import cdpruner_order, conditional_kernel, relevance
from dop.rankers.common import greedy_dpp
from dop.rankers.pdrop import pdrop_policy
from dop.rankers.vispruner import token_scores
from dop.models.prefix import decoder_input
from tiny_models import FAMILIES, IMAGE_TOKEN, build_inputs, build_model

RANKERS = ("vispruner", "cdpruner", "fastv", "pdrop:layers=1-2-3", "dart", "identity", "spatial", "random:seed=3")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(family, eager 4-layer model, 2-image inputs, visual counts), built once per family."""
    fam = request.param
    model = build_model(fam, attn="eager", num_layers=4)
    inputs, counts = build_inputs(model, fam, num_images=2)
    return fam, model, inputs, counts


def _quarter(counts):
    return [max(1, n // 4) for n in counts]


# ---------------------------------------------------------------------- contract
@pytest.mark.parametrize("spec", RANKERS)
@torch.no_grad()
def test_permutation_deterministic_several_images(tiny, spec):
    fam, model, inputs, counts = tiny
    a = rank_visual_tokens(model, inputs, spec, n_keep=_quarter(counts))
    b = rank_visual_tokens(model, inputs, spec, n_keep=_quarter(counts))
    assert a == b, f"{spec} on {fam} is not deterministic"
    assert [sorted(p) for p in a] == [list(range(n)) for n in counts]


@pytest.mark.parametrize("spec", ["vispruner", "cdpruner"])
@torch.no_grad()
def test_set_rankers_honour_n_keep_inside_the_runtime(tiny, spec):
    """The ranking used by a pruned generate() (which may encode the images before the
    forward) is the one rank_visual_tokens gives at the policy's kept count."""
    fam, model, inputs, counts = tiny
    L = get_adapter(model).num_layers
    pol = dop.Policy.token_pruning(L, 0.25)
    seen = {}
    r = resolve_ranker(spec)
    orig = r.rank

    def spy(ctx):
        seen["n_keep"] = list(ctx.n_keep)
        seen["perms"] = [p.tolist() for p in orig(ctx)]
        return seen["perms"]

    r.rank = spy
    with dop.apply_policy(model, pol, ranker=r):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    entry = get_adapter(model).entry_module()
    assert "get_image_features" not in entry.__dict__ and not entry._forward_pre_hooks
    assert not get_adapter(model).vision_module()._forward_pre_hooks
    assert seen["n_keep"] == [pol.n_keep(n) for n in counts]
    assert seen["perms"] == rank_visual_tokens(model, inputs, spec, n_keep=seen["n_keep"])


# ---------------------------------------------------------------------- VisPruner
def _ctx(model, inputs, n_keep=None):
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs["input_ids"], inputs)
    emb = decoder_input(model, inputs, adapter)
    return RankContext(model, adapter, dict(inputs), spans, emb, n_keep or [s.n for s in spans])


def _eager_vision_attentions(model, inputs):
    tower = get_adapter(model).vision_module()
    out = tower(pixel_values=inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:]),
                output_attentions=True)
    return out.attentions


def _vispruner_scores(model, inputs, counts):
    """The ranker's per-token scores (hooked forward, as inside the runtime), checked for shape
    and for not being all equal (else a comparison with a reference proves little)."""
    r = resolve_ranker("vispruner")
    ctx = _ctx(model, inputs)
    r.install(model, ctx.adapter)
    try:
        decoder_input(model, inputs, ctx.adapter)
        scores = token_scores(ctx, r._captured)
    finally:
        r.uninstall()
    assert [sc.numel() for sc in scores] == counts
    flat = torch.cat(scores).double()
    assert not torch.allclose(flat, flat.mean().expand_as(flat), atol=1e-6), "all scores equal: an empty comparison"
    return scores


def _qwen_last_block_received(model, inputs) -> torch.Tensor:
    """Qwen2.5-VL reference, one score per LLM visual token (all images, in the LLM's order):
    the attention probabilities of the tower's last block as transformers' eager attention
    computes them (the module-level ``eager_attention_forward``, wrapped for one forward),
    heads then queries averaged per attention chunk, averaged over the patches of each merge
    unit. Which window-order row holds which patch is found by matching the rows of the
    patch embedding (input order) against the first block's input (window order), not from
    ``get_vision_window_index``; the mapping is confirmed on the tower's own output."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as mq

    tower = get_adapter(model).vision_module()
    assert tower.config._attn_implementation == "eager"
    last = tower.blocks[-1].attn
    grid = inputs["image_grid_thw"]
    seen: dict = {"probs": []}
    original = mq.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kw)
        if module is last:
            assert attention_mask is None  # one call per chunk: its weights are the whole softmax
            seen["probs"].append(weights.detach())
        return out, weights

    hooks = [
        tower.patch_embed.register_forward_hook(lambda m, a, o: seen.__setitem__("embed", o.detach())),
        tower.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("block0", a[0].detach())),
        tower.merger.register_forward_pre_hook(lambda m, a: seen.__setitem__("merger_in", a[0].detach())),
    ]
    mq.eager_attention_forward = spy
    try:
        pooled = tower(inputs["pixel_values"], grid_thw=grid).pooler_output
    finally:
        mq.eager_attention_forward = original
        for h in hooks:
            h.remove()
    # the last block attends over each whole image (one chunk per image, in image order)
    sizes = [int(t * h * w) for t, h, w in grid.tolist()]
    assert [p.shape[-1] for p in seen["probs"]] == sizes
    received = torch.cat([p[0].double().mean(0).mean(0) for p in seen["probs"]])  # window order
    # window position of every input patch, by matching rows (random pixels: rows are distinct)
    embed, block0 = seen["embed"], seen["block0"]
    S = embed.shape[0]
    same = (embed[:, None, :] == block0[None, :, :]).all(-1)  # (input patch, window row)
    assert bool((same.sum(1) == 1).all()) and bool((same.sum(0) == 1).all())
    pos = same.float().argmax(1)  # input patch -> window row
    assert not torch.equal(pos, torch.arange(S)), "the window order is the input order: nothing tested"
    unit = tower.spatial_merge_size**2
    pos = pos.reshape(-1, unit)  # LLM token t <- input patches t*unit .. t*unit+unit-1
    # confirm on transformers' own output: token t is the merger applied to exactly those rows
    x = seen["merger_in"]
    assert torch.allclose(tower.merger(x[pos.reshape(-1)]), pooled, atol=1e-5)
    return received[pos].mean(-1)


@torch.no_grad()
def test_vispruner_scores_are_cls_attention(tiny):
    """Per LLM visual token, the score equals an eager vision forward's attention at the
    feature layer: [CLS] row (LLaVA; LLaVA-NeXT's base tile leads each image), mean attention
    received merged by the pixel shuffle (InternVL), mean attention received in the tower's
    last block averaged over each 2x2 merge unit, in the LLM's token order (Qwen2.5-VL)."""
    fam, model, inputs, counts = tiny
    scores = _vispruner_scores(model, inputs, counts)
    if fam == "qwen2_5_vl":
        for a, b in zip(scores, torch.split(_qwen_last_block_received(model, inputs), counts)):
            assert torch.allclose(a.double(), b, atol=1e-6)
        # the fixture is weak on its own: its tower (0.02 init) attends almost uniformly (scores
        # within an image differ by ~2e-5) and its window order is its own inverse
        # (argsort(window_index) == window_index). Hence a copy whose last block's queries and
        # keys are scaled up (peaked attention), on the fixture's images and on a 12x12 image
        # (3x3 windows) and a 6x10 one (padded windows), whose window orders are not involutions.
        sharp = build_model("qwen2_5_vl", attn="eager", num_layers=2)
        qkv = get_adapter(sharp).vision_module().blocks[-1].attn.qkv
        d = qkv.in_features
        qkv.weight[: 2 * d] *= 20.0
        qkv.bias[: 2 * d] *= 20.0
        gen = torch.Generator().manual_seed(5)
        grids = torch.tensor([[1, 12, 12], [1, 6, 10]])
        wide = {"pixel_values": torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 4 * 4, generator=gen),
                "image_grid_thw": grids}
        wide_counts = [int(n) // 4 for n in grids.prod(-1)]
        ids = [1, 5, 6]
        for n in wide_counts:
            ids += [IMAGE_TOKEN + 2] + [IMAGE_TOKEN] * n + [IMAGE_TOKEN + 3, 7, 8]
        wide["input_ids"] = torch.tensor([ids])
        wide["attention_mask"] = torch.ones(1, len(ids), dtype=torch.long)
        for inp, cnt in ((inputs, counts), (wide, wide_counts)):
            sc = _vispruner_scores(sharp, inp, cnt)
            ref = _qwen_last_block_received(sharp, inp)
            for a, b in zip(sc, torch.split(ref, cnt)):
                assert float(b.max() - b.min()) > 1e-3  # differences far above the tolerance
                assert torch.allclose(a.double(), b, atol=1e-6)
        return
    f = model.config.vision_feature_layer
    att = _eager_vision_attentions(model, inputs)[f].double()  # (tiles, H, S, S)
    if fam in ("llava", "llava_next", "llava_onevision"):
        cls = att.mean(1).mean(1) if fam == "llava_onevision" else att[:, :, 0, 1:].mean(1)  # SigLIP: no [CLS]
        tiles = cls.shape[0] // len(counts)
        for i, sc in enumerate(scores):
            ref = cls[i * tiles]  # the base tile (LLaVA: the only one)
            assert torch.allclose(sc[: ref.numel()], ref, atol=1e-6)
    else:  # internvl: mean received, 2x2 merged
        rec = att.mean(1).mean(1)[:, 1:]
        side = int(rec.shape[1] ** 0.5)
        grid = rec.reshape(-1, side, side)
        merged = grid.reshape(-1, side // 2, 2, side // 2, 2).mean((2, 4))
        for i, sc in enumerate(scores):
            assert torch.allclose(sc, merged[i].reshape(-1), atol=1e-6)


@torch.no_grad()
def test_vispruner_important_part_is_cls_topk():
    model = build_model("llava", attn="eager", num_layers=2)
    inputs, counts = build_inputs(model, "llava", num_images=2)
    att = _eager_vision_attentions(model, inputs)[model.config.vision_feature_layer]
    cls = att[:, :, 0, 1:].mean(1)
    for n_keep in (4, 8, 10):
        perms = rank_visual_tokens(model, inputs, "vispruner", n_keep=n_keep)
        n_imp = int(n_keep * 0.5)
        for i, p in enumerate(perms):
            ref = torch.sort(cls[i].double(), descending=True, stable=True).indices[:n_imp].tolist()
            assert p[:n_imp] == ref
        # a different important ratio moves the split
        perms0 = rank_visual_tokens(model, inputs, "vispruner:important_ratio=1.0", n_keep=n_keep)
        for i, p in enumerate(perms0):
            assert p == torch.sort(cls[i].double(), descending=True, stable=True).indices.tolist()


# ---------------------------------------------------------------------- CDPruner
def _naive_greedy_logdet(L: torch.Tensor, k: int) -> list[int]:
    chosen: list[int] = []
    for _ in range(k):
        best, best_val = None, -float("inf")
        for j in range(L.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            val = torch.linalg.slogdet(L[idx][:, idx])
            v = float(val.logabsdet) if val.sign > 0 else -float("inf")
            if v > best_val + 1e-12:
                best, best_val = j, v
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_greedy_dpp_equals_naive_logdet(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 12, 16
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(3, d, generator=g, dtype=torch.float64)
    L = conditional_kernel(v, relevance(v, t))
    for k in (1, 4, 8, 12):
        assert greedy_dpp(L, k) == _naive_greedy_logdet(L, k)
    assert cdpruner_order(v, t, 5).tolist()[:5] == _naive_greedy_logdet(L, 5)


@torch.no_grad()
def test_cdpruner_follows_the_instruction():
    model = build_model("llava", num_layers=2)
    inputs, counts = build_inputs(model, "llava", num_images=1, seed=1)
    base = rank_visual_tokens(model, inputs, "cdpruner", n_keep=4)[0][:4]
    changed = 0
    for seed in range(3):
        other = dict(inputs)
        ids = inputs["input_ids"].clone()
        text = ids != 100
        text[0, 0] = False
        g = torch.Generator().manual_seed(seed)
        ids[text] = torch.randint(3, 90, (int(text.sum()),), generator=g)
        other["input_ids"] = ids
        sel = rank_visual_tokens(model, other, "cdpruner", n_keep=4)[0][:4]
        changed += sorted(sel) != sorted(base)
    assert changed > 0, "the selection never moved when the instruction changed"
    # sign=-1 (the reference's negated relevance) is a different ranking
    assert rank_visual_tokens(model, inputs, "cdpruner:sign=-1", n_keep=4)[0] != rank_visual_tokens(model, inputs, "cdpruner", n_keep=4)[0]


# ---------------------------------------------------------------------- FastV
@torch.no_grad()
def test_fastv_is_eager_attention_topk(tiny):
    fam, model, inputs, counts = tiny
    adapter = get_adapter(model)
    spans = adapter.image_spans(inputs["input_ids"], inputs)
    K = 2
    att = model(**inputs, output_attentions=True, use_cache=False).attentions[K - 1][0]  # (H, S, S)
    row = att[:, -1, :].double().mean(0)
    perms = rank_visual_tokens(model, inputs, f"fastv:K={K}")
    for span, p in zip(spans, perms):
        ref = torch.sort(row[span.positions], descending=True, stable=True).indices
        k = span.n // 3
        assert sorted(p[:k]) == sorted(ref[:k].tolist()), fam
    # and inside the pruned runtime: the same ranking decides which tokens survive layer K
    L = adapter.num_layers
    pol = dop.Policy(L, [0.25, 1.0], {"attn": [L, K], "mlp": [L, K]})
    with dop.apply_policy(model, pol, ranker=f"fastv:K={K}") as h:
        model(**inputs, use_cache=False)
        final = [r.tolist() for r in h.session.current.ranks]
    for span, p, q in zip(spans, perms, final):
        k = pol.group_bounds(span.n)[0][1]
        assert sorted(p[:k]) == sorted(q[:k])


# ---------------------------------------------------------------------- PDrop
@torch.no_grad()
def test_pdrop_nested_stages_keep_the_right_counts(tiny):
    fam, model, inputs, counts = tiny
    adapter = get_adapter(model)
    L = adapter.num_layers
    layers, lam = (1, 2, 3), 0.5
    pol = pdrop_policy(L, layers, lam)
    S = inputs["input_ids"].shape[1]
    n_text = S - sum(counts)
    with dop.apply_policy(model, pol, ranker="pdrop:layers=1-2-3,ratio=0.5") as h:
        out = model(**inputs, use_cache=True)
        ranks = [r.clone() for r in h.session.current.ranks]
    cache = out.past_key_values
    expected_kept = {0: [n for n in counts]}
    for s, l in enumerate(layers, start=1):
        expected_kept[l] = [int(lam ** s * n + 1e-9) for n in counts]
    for l in range(L):
        stage = max(x for x in expected_kept if x <= l)
        assert cache.layers[l].keys.shape[-2] == n_text + sum(expected_kept[stage]), f"{fam} layer {l}"
    # the standalone ranking is the one the pruned forward made
    assert [r.tolist() for r in ranks] == rank_visual_tokens(model, inputs, "pdrop:layers=1-2-3,ratio=0.5")
    if L == 4:  # the default stage layers are the quarter points of the depth: 1-2-3 here
        assert [r.tolist() for r in ranks] == rank_visual_tokens(model, inputs, "pdrop:ratio=0.5")
    # stage 1 keeps the top of the attention at layer 1 among all tokens (one independent check)
    att = model(**inputs, output_attentions=True, use_cache=False).attentions[1][0, :, -1, :].double().mean(0)
    spans = adapter.image_spans(inputs["input_ids"], inputs)
    for span, r, k in zip(spans, ranks, expected_kept[1]):
        ref = torch.sort(att[span.positions], descending=True, stable=True).indices[:k]
        assert sorted(r[:k].tolist()) == sorted(ref.tolist())


# ---------------------------------------------------------------------- DART
@torch.no_grad()
def test_dart_keeps_pivots_first_and_n_keep_decides():
    model = build_model("llava", num_layers=4)
    inputs, counts = build_inputs(model, "llava", num_images=2)
    a = rank_visual_tokens(model, inputs, "dart:K=2,pivots=2,text_pivots=1", n_keep=6)
    b = rank_visual_tokens(model, inputs, "dart:K=2,pivots=2,text_pivots=1", n_keep=12)
    assert all(x[:2] == y[:2] for x, y in zip(a, b))  # pivots do not depend on the budget
    # inside the runtime, n_keep is what the policy still processes at layer K
    L = 4
    pol = dop.Policy(L, [6 / 16, 1.0], {"attn": [L, 2], "mlp": [L, 2]})
    with dop.apply_policy(model, pol, ranker="dart:K=2,pivots=2,text_pivots=1") as h:
        model(**inputs, use_cache=False)
        final = [r.tolist() for r in h.session.current.ranks]
    assert [sorted(p[:6]) for p in final] == [sorted(p[:6]) for p in a]


def test_bad_options_are_clear_errors():
    for spec, match in [("fastv:K=0", "K"), ("pdrop:ratio=1.5", "ratio"), ("cdpruner:sign=2", "sign"),
                        ("vispruner:important_ratio=2", "important_ratio"), ("dart:K=0", "K")]:
        with pytest.raises(ValueError, match=match):
            resolve_ranker(spec)


def test_in_llm_ranker_needs_active_tokens_below_its_layer():
    model = build_model("llava", num_layers=4)
    with pytest.raises(ValueError, match="inside the LLM"):
        dop.apply_policy(model, dop.Policy.token_pruning(4, 0.25), ranker="fastv:K=2")


def test_all_rankers_registered():
    from dop.rankers import known_rankers

    assert set(known_rankers()) >= {"vispruner", "cdpruner", "fastv", "pdrop", "dart", "identity", "spatial", "random"}


def test_in_llm_ranker_layers_must_exist():
    model = build_model("llava", num_layers=4)
    pol = dop.Policy(4, [0.5, 1.0], {"attn": [4, 4], "mlp": [4, 4]})
    for spec in ("pdrop:layers=8-16-24", "fastv:K=5", "dart:K=4"):
        with pytest.raises(ValueError, match="decoder has 4 layers"):
            dop.apply_policy(model, pol, ranker=spec)
    from dop.runtime.layer import is_patched

    assert not any(is_patched(l) for l in get_adapter(model).decoder_layers())


def test_pdrop_default_stage_layers_are_one_rule_everywhere():
    """Quarter points of the depth in the ranker, the policy and the baseline (issue 16: the
    ranker used a fixed 8-16-24 while `dop baseline` used the quarter points)."""
    from dop import baselines as B
    from dop.rankers import resolve_for_model, resolve_ranker
    from dop.rankers.pdrop import default_stage_layers

    assert [default_stage_layers(L) for L in (32, 40, 8, 4)] == [(8, 16, 24), (10, 20, 30), (2, 4, 6), (1, 2, 3)]
    assert resolve_for_model("pdrop", 8).layers == (2, 4, 6)
    assert resolve_for_model("pdrop:layers=1-3", 8).layers == (1, 3)
    assert pdrop_policy(8).depth["attn"] == (8, 6, 4, 2)
    assert B.pdrop("demo", ratio=0.5)[0].meta["stage_layers"] == [2, 4, 6]
    with pytest.raises(ValueError, match="quarter points"):
        resolve_ranker("pdrop").layers  # unbound: never silently no stages


@pytest.mark.parametrize("grid", [(12, 12), (24, 24), (16, 9), (3, 5)])
def test_spatial_sample_covers_every_quarter_at_every_count(grid):
    """Issue 16: the stride fell to 1 past a third of the tokens and then kept the top rows
    only (48 of 144: the first four rows). A uniform sample reaches every quarter of the grid
    at every count from 4 on, and is a permutation."""
    from dop.rankers.basic import spatial_order

    rows, cols = grid
    n = rows * cols
    for k in range(1, n + 1):
        order = spatial_order(n, grid, k)
        assert sorted(order.tolist()) == list(range(n))
        kept = order[:k]
        quarters = {(int(r >= rows / 2), int(c >= cols / 2)) for r, c in zip((kept // cols).tolist(), (kept % cols).tolist())}
        if k >= 4:
            assert len(quarters) == 4, (grid, k, sorted(quarters))
        rows_used = sorted(set((kept // cols).tolist()))
        if k >= 2 * cols:  # enough for two full rows: the sample reaches the bottom rows too
            assert rows_used[-1] >= rows - 1 - rows // 4 and rows_used[0] <= rows // 4, (grid, k, rows_used)
