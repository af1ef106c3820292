"""Qwen2.5-VL's multimodal RoPE in either layout transformers hands its decoder layers: per
position dimension (3, B, S, head_dim) before 5.17, one row per token after
(docs/design.md, "Supported transformers versions")."""

from __future__ import annotations

import torch

import dop
from dop.models import get_adapter
from reference import masked_reference
from tiny_models import build_inputs, build_model


def test_token_rope_takes_each_channel_from_its_sections_position_dimension():
    adapter = get_adapter(build_model("qwen2_5_vl"))
    # the tiny config's mrope_section [1, 1, 2] covers half the 8 channels, and again the other
    # half: temporal, height, width, width, twice
    dim_of_channel = [0, 1, 2, 2, 0, 1, 2, 2]
    g = torch.Generator().manual_seed(0)
    cos, sin = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(2))
    merged = adapter.token_rope((cos, sin))
    for got, per_dim in zip(merged, (cos, sin)):
        assert got.shape == (2, 5, 8)
        for c, d in enumerate(dim_of_channel):
            assert torch.equal(got[..., c], per_dim[d, ..., c])
    assert adapter.token_rope(merged) is merged  # already one row per token: left as it is
    assert adapter.token_rope(None) is None


@torch.no_grad()
def test_a_layer_computes_the_same_from_its_own_layout_and_the_per_token_one():
    """What the runtime records and replays is the per-token layout; ``layer_rope`` must give
    the installed version's layer exactly what the model itself hands it."""
    model = build_model("qwen2_5_vl")
    adapter = get_adapter(model)
    inputs, _ = build_inputs(model, "qwen2_5_vl")
    layer = adapter.decoder_layers()[1]
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

    hook = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hook.remove()
    own = seen.pop("position_embeddings")
    hidden = seen.pop("hidden")
    seen.pop("hidden_states", None)
    per_token = adapter.token_rope(own)
    assert per_token[0].shape == (*hidden.shape[:2], own[0].shape[-1])
    want = layer(hidden, position_embeddings=own, **seen)
    got = layer(hidden, position_embeddings=adapter.layer_rope(per_token), **seen)
    assert torch.equal(got, want)


@torch.no_grad()
def test_pruned_equals_masked_reference_with_3d_positions():
    """With token types given (as the processor gives them), image tokens get distinct temporal,
    height and width positions, so each mrope section rotates by its own dimension; the tiny
    inputs elsewhere carry none and their three dimensions coincide."""
    model = build_model("qwen2_5_vl").double()
    adapter = get_adapter(model)
    inputs, counts = build_inputs(model, "qwen2_5_vl", num_images=2)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == adapter.image_token_id).int()
    seen = {}
    hook = adapter.language_model().rotary_emb.register_forward_pre_hook(lambda m, args: seen.update(pos=args[1]))
    try:
        vanilla = model(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    assert not torch.equal(seen["pos"][1], seen["pos"][2]), "the positions should differ by dimension"
    L = adapter.num_layers
    policy = {"format": "dop-policy/1", "num_layers": L, "groups": [0.5, 1.0],
              "depth": {"attn_q": [L, 1], "attn_kv": [L - 1, 2], "mlp": [L, 0]}}
    g = torch.Generator().manual_seed(4)
    perms = [torch.randperm(n, generator=g).tolist() for n in counts]
    with masked_reference(model, adapter.decoder_layers(), adapter.entry_module(), adapter.image_token_id,
                          policy, counts, perms):
        ref = model(**inputs, use_cache=False).logits
    with dop.apply_policy(model, dop.Policy.from_dict(policy), ranker=lambda ctx: perms):
        out = model(**inputs, use_cache=False).logits
    assert (ref - vanilla).abs().max().item() > 1e-2, "the policy should move the logits"
    assert (out - ref).abs().max().item() < 1e-6
