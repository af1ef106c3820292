"""Analytic FLOPs (docs/design.md, "FLOPs") against the published convention and FlopCounterMode.

The decoders are built at the real layer widths of the supported models (2 layers, random
weights, eager attention, float32); the count is per layer, so 2 layers are enough.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dop import Policy, PolicyError
from dop.cli import main
from dop.flops import budget_from_tokens, count_flops, presets

N_VIS = 64  # visual tokens per image in the measured models (112 px image, 14 px patches)
TEXT_BEFORE, TEXT_AFTER = 5, 11  # 16 text tokens around the image
IMAGE_TOKEN = 100
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)
_LAYER_KEY = re.compile(r"^(?!.*vision).*\blayers\.(\d+)$")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1.0)


def _measure(model, **inputs) -> tuple[list[int], dict[str, int]]:
    """FLOPs per decoder layer (FlopCounterMode's per-module breakdown) and per module."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    totals = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    layers: dict[int, int] = {}
    for key, value in totals.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers[int(m.group(1))] = value
    assert layers, f"no decoder layer in FlopCounterMode's breakdown: {sorted(totals)}"
    return [layers[i] for i in sorted(layers)], totals


def _module_flops(totals: dict[str, int], suffix: str) -> int:
    return sum(v for k, v in totals.items() if k.endswith(suffix))


def _build(model_cls, cfg):
    """A random model, built fast: skip transformers' per-module init (several seconds for
    ~400M parameters on 2 cores) and fill every parameter from one seeded uniform draw.
    FLOPs do not depend on the values."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layout: plain (slower) init
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = model_cls(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=g)
    return model.eval()


# --------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def llava7b():
    """LLaVA with LLaVA-1.5-7B decoder widths (2 layers, tiny vocab) and a tiny CLIP tower."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        text_config=dict(model_type="llama", num_hidden_layers=2, vocab_size=128, **LLAMA_7B),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=112, patch_size=14,
        ),
        image_token_index=IMAGE_TOKEN,
        attn_implementation="eager",
    )
    model = _build(LlavaForConditionalGeneration, cfg)
    yield model
    del model


@pytest.fixture(scope="module")
def qwen7b():
    """Qwen2.5-VL with Qwen2.5-7B decoder widths (2 layers, tiny vocab) and a tiny vision tower
    (4 px patches, 16 px windows, layer 1 full attention)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            model_type="qwen2_5_vl_text", num_hidden_layers=2, vocab_size=128, bos_token_id=1, eos_token_id=2,
            # the checkpoint's mrope sections, spelled out: transformers 5.16 has no default for them
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
            **QWEN_7B,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=QWEN_7B["hidden_size"],
            patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=IMAGE_TOKEN + 2, vision_end_token_id=IMAGE_TOKEN + 3,
        bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    model = _build(Qwen2_5_VLForConditionalGeneration, cfg)
    yield model
    del model


def _qwen_inputs() -> dict:
    """One 64x64 px image: a 16x16 grid of 4 px patches, merged 2x2 into 64 visual tokens."""
    ids = list(range(1, 1 + TEXT_BEFORE)) + [IMAGE_TOKEN + 2] + [IMAGE_TOKEN] * N_VIS + [IMAGE_TOKEN + 3]
    ids += list(range(10, 10 + TEXT_AFTER))
    g = torch.Generator().manual_seed(1)
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(4 * N_VIS, 3 * 2 * 4 * 4, generator=g),
        image_grid_thw=torch.tensor([[1, 16, 16]]),
        logits_to_keep=1,
    )


def _llava_inputs(num_images: int = 1) -> dict:
    ids = list(range(1, 1 + TEXT_BEFORE))
    for i in range(num_images):
        ids += [IMAGE_TOKEN] * N_VIS + ([7, 8] if i + 1 < num_images else [])
    ids += list(range(10, 10 + TEXT_AFTER))
    g = torch.Generator().manual_seed(1)
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(num_images, 3, 112, 112, generator=g),
        logits_to_keep=1,
    )


def _text_tokens(inputs: dict) -> int:
    """Every non-image position is a text token (Qwen's vision start/end markers included)."""
    return int((inputs["input_ids"] != IMAGE_TOKEN).sum())


# --------------------------------------------------------------------------- (a) paper convention
@pytest.mark.parametrize("n, tflops", [(576, 3.82), (192, 1.25), (128, 0.83), (64, 0.42)])
def test_paper_convention_matches_published_llava_7b(n, tflops):
    r = count_flops("llava-1.5-7b", num_visual_tokens=n, num_text_tokens=64, convention="paper")
    assert round(r.tflops("decoder"), 2) == tflops
    assert r.total == r.decoder  # the paper counts only decoder visual tokens
    # the same figure as token pruning expressed as a policy (n of 576 tokens at every layer)
    pol = Policy.token_pruning(32, n / 576, depth=0)
    p = count_flops("llava-1.5-7b", pol, num_visual_tokens=576, num_text_tokens=64, convention="paper")
    assert p.decoder == r.decoder


def test_paper_convention_under_op_policy_splits_terms():
    d, m = 4096, 11008
    pol = Policy(32, [0.25, 1.0], {"attn_q": [32, 4], "attn_kv": [32, 8], "mlp": [16, 0]})
    r = count_flops("llava-1.5-7b", pol, num_visual_tokens=576, num_text_tokens=0, convention="paper")
    expected = 0
    for layer in range(32):
        nq = 576 if layer < 4 else 144
        nkv = 576 if layer < 8 else 144
        nm = 144 if layer < 16 else 0
        expected += 2 * nq * d * d + 2 * nkv * d * d + 2 * nq * nkv * d + 3 * nm * d * m
    assert r.decoder == expected


def test_budget_from_tokens():
    assert budget_from_tokens("llava-1.5-7b", 64) == pytest.approx(0.4155 / 3.8172, rel=1e-3)
    assert budget_from_tokens("llava-1.5-7b", 576) == 1.0
    with pytest.raises(ValueError, match="n_tokens"):
        budget_from_tokens("llava-1.5-7b", 600)


# --------------------------------------------------------------------------- (b) unpruned vs FlopCounterMode
def test_unpruned_llama_7b_widths_match_flop_counter(llava7b):
    lm = llava7b.model.language_model  # a LlamaModel at LLaVA-1.5-7B widths, 2 layers
    n_text = TEXT_BEFORE + TEXT_AFTER
    embeds = torch.randn(1, N_VIS + n_text, LLAMA_7B["hidden_size"])
    measured, _ = _measure(lm, inputs_embeds=embeds)
    r = count_flops(llava7b, num_visual_tokens=N_VIS, num_text_tokens=n_text)
    assert len(measured) == len(r.per_layer) == 2
    for got, want in zip(measured, r.per_layer):
        assert _rel(want, got) < 0.01
    assert _rel(r.decoder, sum(measured)) < 0.01


def test_unpruned_qwen_7b_widths_gqa_match_flop_counter(qwen7b):
    lm = qwen7b.model.language_model  # Qwen2.5-7B decoder widths (GQA: 28 query, 4 key/value heads)
    n_text = 16
    measured, _ = _measure(lm, inputs_embeds=torch.randn(1, N_VIS + n_text, QWEN_7B["hidden_size"]))
    r = count_flops(qwen7b, num_visual_tokens=N_VIS, num_text_tokens=n_text)
    assert len(measured) == len(r.per_layer) == 2
    for got, want in zip(measured, r.per_layer):
        assert _rel(want, got) < 0.01
    # the presets' decoder layer is this layer
    for preset in ("qwen2.5-vl-7b", "internvl3-8b"):
        assert count_flops(preset, num_visual_tokens=N_VIS, num_text_tokens=n_text).per_layer[0] == r.per_layer[0]


def test_llava_vision_projector_lm_head_match_flop_counter(llava7b):
    inputs = _llava_inputs()
    _, totals = _measure(llava7b, **inputs)
    r = count_flops(llava7b, num_visual_tokens=N_VIS, num_text_tokens=_text_tokens(inputs))
    assert _rel(r.vision, _module_flops(totals, "model.vision_tower")) < 0.01
    assert r.projector == _module_flops(totals, "model.multi_modal_projector")
    assert r.lm_head == _module_flops(totals, ".lm_head")


def test_qwen_vision_window_attention_merger_lm_head_match_flop_counter(qwen7b):
    inputs = _qwen_inputs()
    _, totals = _measure(qwen7b, **inputs)
    r = count_flops(qwen7b, num_visual_tokens=N_VIS, num_text_tokens=_text_tokens(inputs))
    merger = _module_flops(totals, "model.visual.merger")
    assert r.projector == merger
    assert _rel(r.vision, _module_flops(totals, "model.visual") - merger) < 0.01
    assert r.lm_head == _module_flops(totals, ".lm_head")


# --------------------------------------------------------------------------- (c) pruned runtime vs analytic
SKIP_POLICIES = {  # per-layer skips (docs/design.md, "Per-layer skips"): holes below the depths
    "shortv-like": Policy(2, [1.0], {}, skip={"attn_q": [[1]], "mlp": [[1]]}),
    "gsop-like": Policy(2, [0.25, 0.5, 1.0], {"attn_q": [2, 2, 1]},
                        skip={"attn_q": [[1], [0], []], "attn_kv": [[0], [1], [0, 1]], "mlp": [[], [0, 1], [1]]}),
}
POLICIES = {
    "token-pruning": Policy(2, [0.25, 1.0], {"attn": [2, 0], "mlp": [2, 0]}),
    "all-kinds-3-groups": Policy(2, [0.25, 0.5, 1.0], {"attn_q": [2, 1, 0], "attn_kv": [2, 2, 1], "mlp": [2, 1, 1]}),
    "attn_q-only": Policy(2, [0.375, 1.0], {"attn_q": [1, 0]}),
    "attn_kv-only": Policy(2, [0.25, 1.0], {"attn_kv": [2, 0]}),
    "mlp-only": Policy(2, [0.5, 1.0], {"mlp": [2, 0]}),
    "everything-skipped": Policy(2, [1.0], {"attn": [0], "mlp": [0]}),
    "full-depth": Policy(2, [0.5, 1.0], {"attn": [2, 2], "mlp": [2, 2]}),
    **{"per-layer-" + k: v for k, v in SKIP_POLICIES.items()},
}


@pytest.mark.parametrize(
    "name, num_images", [(n, 1) for n in sorted(POLICIES)] + [("all-kinds-3-groups", 2)]
)
def test_pruned_runtime_matches_analytic(llava7b, name, num_images):
    from dop import apply_policy

    policy = POLICIES[name]
    inputs = _llava_inputs(num_images)
    with apply_policy(llava7b, policy, ranker="identity"):
        measured, _ = _measure(llava7b, **inputs)
    r = count_flops(
        llava7b, policy, num_visual_tokens=N_VIS, num_text_tokens=_text_tokens(inputs), num_images=num_images
    )
    assert len(measured) == 2
    for layer, (got, want) in enumerate(zip(measured, r.per_layer)):
        assert _rel(want, got) < 0.01, f"layer {layer}: analytic {want} vs measured {got}"
    assert _rel(r.decoder, sum(measured)) < 0.01
    if not policy.is_unpruned():
        assert r.decoder < r.decoder_unpruned


# --------------------------------------------------------------------------- (d) inputs, errors, CLI
def test_preset_config_folder_and_model_agree(llava7b, tmp_path):
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        text_config=dict(model_type="llama", num_hidden_layers=32, vocab_size=32064, **LLAMA_7B),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=336, patch_size=14,
        ),
    )
    cfg.save_pretrained(tmp_path)
    pol = Policy(32, [0.125, 0.25, 0.5, 1.0], {"attn": [32, 24, 12, 2], "mlp": [32, 16, 6, 0]})
    kw = dict(num_visual_tokens=576, num_text_tokens=40)
    a, b, c = (count_flops(x, pol, **kw) for x in ("llava-1.5-7b", cfg, str(tmp_path)))
    assert a.per_layer == b.per_layer == c.per_layer
    assert a.total == b.total == c.total and a.vision == b.vision and a.lm_head == b.lm_head
    assert count_flops("llava-hf/llava-1.5-7b-hf", pol, **kw).total == a.total  # hub id alias
    m, k = count_flops(llava7b, **kw), count_flops(llava7b.config, **kw)
    assert m.to_dict() == k.to_dict()


def test_presets_ship_with_sources():
    assert set(presets()) >= {
        "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-next-13b", "qwen2.5-vl-7b", "internvl3-8b",
    }
    from dop.flops import load_preset_data

    for name in presets():
        data = load_preset_data(name)
        assert data["sources"] and data["hub_id"] and data["visual_tokens"]["default"] > 0
        r = count_flops(name, num_text_tokens=64)
        assert 0 < r.decoder < r.total


def test_multiple_images_grouped_each_on_its_own():
    pol = Policy(32, [0.5, 1.0], {"attn": [32, 0], "mlp": [32, 0]})
    two = count_flops("llava-1.5-7b", pol, num_visual_tokens=5, num_images=2, convention="paper")
    assert two.per_layer[-1] == count_flops("llava-1.5-7b", num_visual_tokens=4, convention="paper").per_layer[-1]
    assert two.decoder == count_flops("llava-1.5-7b", pol, num_visual_tokens=[5, 5], convention="paper").decoder


@pytest.mark.parametrize("convention", ["dop", "paper"])
def test_cost_model_prices_per_layer_skips_as_count_flops(convention):
    """search.cost.CostModel.policy_cost equals count_flops exactly under per-layer skips, and a
    skip removes exactly its rows: the ShortV-like policy of 32 layers saves 8 layers' attn_q + mlp."""
    from dop.search.cost import CostModel

    cost = CostModel("llava-1.5-7b", [576, 100], 40, convention=convention)
    shortv = Policy(32, [1.0], {}, skip={"attn_q": [list(range(8, 32, 3))], "mlp": [list(range(8, 32, 3))]})
    gsop = SKIP_POLICIES["gsop-like"].transfer(32).with_skip(mlp=[[0, 31], [5], [2, 3]])
    for pol in (shortv, gsop, gsop.with_skip({})):
        want = count_flops("llava-1.5-7b", pol, num_visual_tokens=[576, 100], num_text_tokens=40, convention=convention)
        assert cost.policy_cost(pol) == want.decoder, pol
    full = cost.layer(676, 676, 676)
    assert cost.unpruned - cost.policy_cost(shortv) == 8 * (full - cost.layer(0, 676, 0))


def test_errors():
    with pytest.raises(ValueError, match="known presets: .*llava-1.5-7b"):
        count_flops("llava-9b", num_visual_tokens=576, num_text_tokens=0)
    with pytest.raises(PolicyError, match="num_layers"):
        count_flops("qwen2.5-vl-7b", Policy.unpruned(32), num_visual_tokens=576, num_text_tokens=0)
    ok = count_flops("qwen2.5-vl-7b", Policy(32, [1.0], {"mlp": [16]}), num_visual_tokens=9, transfer=True)
    assert ok.decoder < ok.decoder_unpruned
    with pytest.raises(ValueError, match="convention"):
        count_flops("llava-1.5-7b", num_visual_tokens=576, convention="macs")
    with pytest.raises(ValueError, match="num_visual_tokens"):
        count_flops("llava-1.5-7b", num_visual_tokens=-1)


def test_cli_table_json_and_errors(tmp_path, capsys):
    pol = tmp_path / "p.json"
    Policy(32, [0.125, 1.0], {"attn": [32, 2], "mlp": [32, 0]}).to_json(pol)
    args = ["flops", "--model", "llava-1.5-7b", "--policy", str(pol), "--visual-tokens", "576", "--text-tokens", "64"]
    assert main(args + ["--convention", "both"]) == 0
    out = capsys.readouterr().out
    assert "decoder TFLOPs" in out and "total TFLOPs" in out and "TMACs (paper" in out and "3.817" in out
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)["dop"]
    assert data["decoder"] < data["decoder_unpruned"] and data["total"] > data["decoder"]
    assert main(["flops", "--model", "llava-9b", "--text-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "known presets" in err
    assert main(["flops", "--model", "internvl3-8b", "--policy", str(pol)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_layers" in err


QWEN_POLICIES = {
    "all-kinds-3-groups": Policy(2, [0.25, 0.5, 1.0], {"attn_q": [2, 1, 0], "attn_kv": [2, 2, 1], "mlp": [2, 1, 1]}),
    "attn-mlp-2-groups": Policy(2, [0.5, 1.0], {"attn": [2, 1], "mlp": [1, 0]}),
    "per-layer-gsop-like": SKIP_POLICIES["gsop-like"],
}


@pytest.mark.parametrize("name", sorted(QWEN_POLICIES))
def test_pruned_runtime_matches_analytic_gqa_qwen(qwen7b, name):
    from dop import apply_policy

    policy = QWEN_POLICIES[name]
    inputs = _qwen_inputs()
    with apply_policy(qwen7b, policy, ranker="identity"):
        measured, _ = _measure(qwen7b, **inputs)
    r = count_flops(qwen7b, policy, num_visual_tokens=N_VIS, num_text_tokens=_text_tokens(inputs))
    for layer, (got, want) in enumerate(zip(measured, r.per_layer)):
        assert _rel(want, got) < 0.01, f"layer {layer}: analytic {want} vs measured {got}"
    assert r.decoder < r.decoder_unpruned
