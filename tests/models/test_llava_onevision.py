"""LLaVA-OneVision, the family added as docs/design.md's "Adding a family" example.

The suite-wide tests run it through tests/tiny_models.py (images encoded as if each were
alone in its prompt, every one in any-resolution tiles). Here: inputs as the processor
makes them (``batch_num_images``: the images of a multi-image prompt are base tiles only,
possibly adjacent), the token counts against the model and the processor, VisPruner's
score layout, FLOPs against FlopCounterMode at real widths, and the presets.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers as T

import dop
from dop.flops import count_flops, load_preset_data
from dop.models import get_adapter
from dop.models.llava_onevision import TYPICAL_IMAGE, packed_counts, tiles_per_image
from dop.rankers import resolve_ranker
from dop.runtime import rank_visual_tokens
from test_flops import _build, _measure, _rel
from test_rankers import _eager_vision_attentions, _vispruner_scores
from test_runtime import _against_reference, _double, _perms, random_policy
from tiny_models import IMAGE_TOKEN, build_model, collate, text_only_inputs

FAM = "llava_onevision"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _image_features(model, inputs) -> list[int]:
    """Visual tokens of each image as the model itself packs them."""
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs.get("batch_num_images"),
        )
    return [int(f.shape[0]) for f in out.pooler_output]


def processor_prompt(model, sizes, seed=0, adjacent=False) -> tuple[dict, list[int]]:
    """One prompt as LlavaOnevisionProcessor makes it: ``batch_num_images`` given, so the
    images of a multi-image prompt are one base tile each; ``adjacent`` puts no text between
    images (the chat template renders ``<image>`` tokens back to back)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {"pixel_values": torch.randn(len(sizes), 5, 3, 32, 32, generator=gen),
              "image_sizes": torch.tensor(sizes), "batch_num_images": torch.tensor([len(sizes)])}
    counts = _image_features(model, inputs)
    ids = [1] + torch.randint(3, 90, (4,), generator=gen).tolist()
    for n in counts:
        ids += [IMAGE_TOKEN] * n + ([] if adjacent else torch.randint(3, 90, (2,), generator=gen).tolist())
    ids += torch.randint(3, 90, (5,), generator=gen).tolist()
    inputs.update(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return inputs, counts


# ---------------------------------------------------------------------- token counts
@pytest.mark.parametrize("sizes, per_prompt", [
    ([[48, 64]], [1]), ([[64, 32]], [1]), ([[32, 32]], [1]), ([[48, 64], [64, 32]], [2]),
    ([[48, 64], [64, 32], [64, 64]], [2, 1]), ([[48, 64], [64, 64]], None),
])
def test_image_counts_are_the_models(sizes, per_prompt):
    model = build_model(FAM)
    inputs = {"pixel_values": torch.randn(len(sizes), 5, 3, 32, 32), "image_sizes": torch.tensor(sizes)}
    if per_prompt is not None:
        inputs["batch_num_images"] = torch.tensor(per_prompt)
    assert get_adapter(model).image_counts(inputs) == _image_features(model, inputs)


@pytest.mark.parametrize("height, width", [(480, 640), (640, 480), (384, 384), (1080, 1920), (2304, 2304),
                                           (300, 1200), (1000, 200), (37, 50), (768, 1024)])
def test_counts_at_real_size_equal_the_processors(height, width):
    """The real config's counts (any-resolution grid, unpadding, ``anyres_max_9`` shrink)
    equal LlavaOnevisionProcessor's own arithmetic, which is written apart from the model's."""
    cfg = T.LlavaOnevisionConfig()
    proc = T.LlavaOnevisionProcessor
    stand_in = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints),
                               num_image_tokens=729, vision_aspect_ratio=cfg.vision_aspect_ratio)
    stand_in._get_unpadded_features = lambda *a: proc._get_unpadded_features(stand_in, *a)
    assert packed_counts(cfg, [[height, width]]) == [proc._get_number_of_features(stand_in, height, width, 384, 384)]
    assert packed_counts(cfg, [[height, width]] * 2, [2]) == [730, 730]  # multi-image: base tile + newline


def test_adjacent_images_are_split_by_their_counts():
    model = build_model(FAM)
    inputs, counts = processor_prompt(model, [[48, 64], [64, 32], [32, 64]], adjacent=True)
    spans = get_adapter(model).image_spans(inputs["input_ids"], inputs)
    assert [s.n for s in spans] == counts == [17, 17, 17]
    assert spans[1].positions[0] == spans[0].positions[-1] + 1  # nothing between them
    with pytest.raises(ValueError, match="batch_num_images counts 2 images but image_sizes has 3"):
        tiles_per_image(model.config, inputs["image_sizes"], [2])


# ---------------------------------------------------------------------- exactness
@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model64(request):
    return build_model(FAM, attn=request.param).double()


@torch.no_grad()
def test_processor_inputs_pruned_equal_the_masked_reference(model64):
    """A 2-image prompt (base tiles, adjacent) and a single any-resolution image (unpadded and
    shrunk): prefill logits to 1e-6 and greedy decoding against the masked reference."""
    adapter = get_adapter(model64)
    rng = random.Random(7)
    for seed, (sizes, adjacent) in enumerate([([[48, 64], [64, 32]], True), ([[48, 64]], False)]):
        inputs, counts = processor_prompt(model64, sizes, seed=seed, adjacent=adjacent)
        inputs = _double(inputs)
        vanilla = model64(**inputs).logits
        for trial in range(3):
            pd = random_policy(rng, adapter.num_layers)
            diff, ref = _against_reference(model64, inputs, counts, pd, _perms(counts, trial), new_tokens=4)
            assert diff < 1e-6, f"{sizes} {pd}"
        assert (ref - vanilla).abs().max().item() > 1e-3  # the last policy moved the logits


@torch.no_grad()
def test_processor_batch_with_padding_equals_rows_one_by_one(model64):
    """Rows of 2, 0 and 1 images (``batch_num_images`` [2, 1]), padded on the left."""
    prompts = [_double(processor_prompt(model64, [[48, 64], [64, 32]], seed=1)[0]),
               _double(text_only_inputs(text_len=9)),
               _double(processor_prompt(model64, [[48, 64]], seed=2)[0])]
    batch = collate(prompts, "left")
    assert batch["batch_num_images"].tolist() == [2, 1]
    L = get_adapter(model64).num_layers
    pol = dop.Policy(L, [0.25, 0.5, 1.0], {"attn_q": [L, 2, 1], "attn_kv": [L, 1, 0], "mlp": [L, 3, 0]})
    with dop.apply_policy(model64, pol, ranker="random:seed=1"):
        single = [model64(**p).logits[0] for p in prompts]
        batched = model64(**batch).logits
        gen_single = [model64.generate(**p, max_new_tokens=4, do_sample=False)[0, -4:].tolist() for p in prompts]
        gen_batched = model64.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:].tolist()
    for row, ref in enumerate(single):
        assert (batched[row, -ref.shape[0]:] - ref).abs().max().item() < 1e-6
    assert gen_batched == gen_single


# ---------------------------------------------------------------------- rankers
def _received(model, pixel_values) -> torch.Tensor:
    """(tiles, tokens): mean attention each patch receives at the feature layer, from an eager
    vision forward (heads, then queries averaged)."""
    att = _eager_vision_attentions(model, {"pixel_values": pixel_values})[model.config.vision_feature_layer]
    return att.double().mean(1).mean(1)


@torch.no_grad()
def test_vispruner_scores_follow_the_any_resolution_layout():
    """A 64x32 image alone: base tile, then the 2x1 grid's 8 rows of 4 patches, each row
    followed by its newline (no attention: lowest). Written out by hand, not by the pack step."""
    model = build_model(FAM, attn="eager", num_layers=2)
    inputs, counts = processor_prompt(model, [[64, 32]])
    (scores,) = _vispruner_scores(model, inputs, counts)
    rec = _received(model, inputs["pixel_values"][0, :3])  # base tile + the 2 grid tiles
    side = 4
    rows = [rec[1 + r // side, (r % side) * side:(r % side + 1) * side] for r in range(2 * side)]
    expected = torch.cat([rec[0]] + [torch.cat([row, row.new_full((1,), float("nan"))]) for row in rows])
    newline = torch.isnan(expected)
    assert scores.numel() == expected.numel() == 16 + 8 * 5
    assert torch.allclose(scores[~newline].double(), expected[~newline], atol=1e-9)
    assert float(scores[newline].max()) < float(scores[~newline].min())


@torch.no_grad()
def test_vispruner_scores_of_a_shrunk_grid_and_of_multi_image_prompts():
    model = build_model(FAM, attn="eager", num_layers=2)
    inputs, counts = processor_prompt(model, [[48, 64]])  # 2x2 grid, unpadded to 6x8, shrunk to 4x6
    (scores,) = _vispruner_scores(model, inputs, counts)
    rec = _received(model, inputs["pixel_values"][0])
    grid = scores[16:].reshape(4, 7)
    assert torch.allclose(scores[:16].double(), rec[0], atol=1e-9)
    assert float(grid[:, -1].max()) < float(grid[:, :-1].min())  # the newlines
    inside = grid[:, :-1].double()  # bilinear interpolation stays within the grid tiles' range
    assert float(inside.min()) >= float(rec[1:].min()) - 1e-9 and float(inside.max()) <= float(rec[1:].max()) + 1e-9
    two, two_counts = processor_prompt(model, [[48, 64], [64, 32]], adjacent=True)
    scores = _vispruner_scores(model, two, two_counts)
    rec = _received(model, two["pixel_values"][:, 0])  # multi-image prompt: base tiles only
    for i, sc in enumerate(scores):
        assert torch.allclose(sc[:16].double(), rec[i], atol=1e-9) and float(sc[16]) < float(sc[:16].min())


@pytest.mark.parametrize("spec", ["vispruner", "cdpruner", "spatial", "random:seed=2", "identity"])
@torch.no_grad()
def test_rankers_inside_generate_with_processor_inputs(spec):
    """generate() encodes the images before the forward that ranks and drops image_sizes and
    batch_num_images from it: the ranking is still the one rank_visual_tokens gives."""
    model = build_model(FAM, attn="eager", num_layers=4)
    inputs, counts = processor_prompt(model, [[48, 64], [64, 32]], adjacent=True)
    pol = dop.Policy.token_pruning(4, 0.25, depth=2)
    seen = {}
    ranker = resolve_ranker(spec)
    original = ranker.rank

    def spy(ctx):
        seen["counts"], seen["n_keep"] = list(ctx.counts), list(ctx.n_keep)
        seen["perms"] = [list(map(int, p)) for p in original(ctx)]
        return seen["perms"]

    ranker.rank = spy
    with dop.apply_policy(model, pol, ranker=ranker):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert seen["counts"] == counts
    assert seen["perms"] == rank_visual_tokens(model, inputs, spec, n_keep=seen["n_keep"])
    assert "get_image_features" not in get_adapter(model).entry_module().__dict__


# ---------------------------------------------------------------------- FLOPs and presets
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
              image_size=384, patch_size=14, vision_use_head=False)


@pytest.fixture(scope="module")
def onevision7b():
    """LLaVA-OneVision at the 7B's widths: Qwen2-7B decoder and SigLIP so400m tower, 2 layers each."""
    cfg = T.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", num_hidden_layers=2, vocab_size=128, **QWEN2_7B),
        vision_config=dict(num_hidden_layers=2, **SIGLIP), image_token_index=IMAGE_TOKEN,
        attn_implementation="eager",
    )
    return _build(T.LlavaOnevisionForConditionalGeneration, cfg)


def test_decoder_flops_match_flop_counter_and_presets(onevision7b):
    n_vis, n_text = 64, 16
    measured, _ = _measure(onevision7b.model.language_model, inputs_embeds=torch.randn(1, n_vis + n_text, 3584))
    r = count_flops(onevision7b, num_visual_tokens=n_vis, num_text_tokens=n_text)
    assert len(measured) == len(r.per_layer) == 2
    assert all(_rel(want, got) < 0.01 for got, want in zip(measured, r.per_layer))
    preset = count_flops("llava-onevision-qwen2-7b-ov", num_visual_tokens=n_vis, num_text_tokens=n_text)
    assert preset.per_layer[0] == r.per_layer[0] and len(preset.per_layer) == 28
    small = T.Qwen2Model(T.Qwen2Config(num_hidden_layers=2, vocab_size=128, hidden_size=896, intermediate_size=4864,
                                       num_attention_heads=14, num_key_value_heads=2, attn_implementation="eager"))
    measured, _ = _measure(small.eval(), inputs_embeds=torch.randn(1, n_vis + n_text, 896))
    half = count_flops("llava-onevision-qwen2-0.5b-ov", num_visual_tokens=n_vis, num_text_tokens=n_text)
    assert len(half.per_layer) == 24 and _rel(half.per_layer[0], measured[0]) < 0.01


def test_vision_and_projector_flops_match_flop_counter(onevision7b):
    """A 384x384 image alone: the base tile and one grid tile, 2 x 729 patches through the
    tower and the projector; 729 + 27 x 27 + 27 newlines visual tokens."""
    sizes = [[384, 384]]
    n = packed_counts(onevision7b.config, sizes)[0]
    assert n == 729 + 729 + 27
    pixel_values = torch.randn(1, 2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        onevision7b.model.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor(sizes))
    totals = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    projector, tower = totals["LlavaOnevisionMultiModalProjector"], totals["SiglipVisionModel"]
    r = count_flops(onevision7b, num_visual_tokens=n, num_tiles=2)
    assert r.projector == projector == 2 * 2 * 729 * (1152 * 3584 + 3584 * 3584)
    assert _rel(r.vision, tower) < 0.01


def test_presets_agree_with_the_adapter_reading_a_config(tmp_path):
    """The 7B preset equals what the adapter reads from a config of the same numbers
    (a config object and a checkpoint folder), the hub id is an alias."""
    cfg = T.LlavaOnevisionConfig(text_config=dict(model_type="qwen2", num_hidden_layers=28, vocab_size=152128,
                                                  **QWEN2_7B))
    cfg.save_pretrained(tmp_path)
    pol = dop.Policy(28, [0.25, 1.0], {"attn": [28, 6], "mlp": [28, 3]})
    a, b, c, d = (count_flops(x, pol, num_text_tokens=40) for x in
                  ("llava-onevision-qwen2-7b-ov", cfg, str(tmp_path), "llava-hf/llava-onevision-qwen2-7b-ov-hf"))
    assert a.num_visual_tokens == b.num_visual_tokens == (packed_counts(cfg, [TYPICAL_IMAGE])[0],) == (2929,)
    for other in (b, c, d):
        assert (other.per_layer, other.vision, other.projector, other.lm_head) == (a.per_layer, a.vision,
                                                                                   a.projector, a.lm_head)
    data = load_preset_data("llava-onevision-qwen2-7b-ov")["visual_tokens"]
    assert data["image_grid_pinpoints"] == cfg.image_grid_pinpoints and data["max_tiles"] == 37
    # the default count encodes as many tiles as the model does for that image
    assert tiles_per_image(cfg, [TYPICAL_IMAGE]) == [5]
    assert a.vision == count_flops(cfg, num_visual_tokens=2929, num_tiles=5).vision
