"""Tiny random models of the supported families, built from configs (no downloads),
with ready-made inputs (text + one or more images). Used across the test-suite."""

from __future__ import annotations

import inspect

import torch
import transformers as T

FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "internvl", "llava_onevision")
VOCAB = 128
IMAGE_TOKEN = 100
# LLaVA-OneVision: up to 2x2 tiles of 32 px; "anyres_max_2" shrinks a grid above ~2 tiles' worth
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
ONEVISION_SIZES = ([48, 64], [64, 32])  # unpadded and shrunk (44 tokens); a 2x1 grid (56 tokens)


def _llama_text(**kw):
    base = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def _clip_vision(image_size=32, patch_size=8):
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=32,
    )


def make_config(family: str, attn: str = "sdpa", num_layers: int = 4):
    if family == "llava":
        cfg = T.LlavaConfig(
            vision_config=_clip_vision(),
            text_config=dict(model_type="llama", **_llama_text(num_hidden_layers=num_layers)),
            image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
        )
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(
            vision_config=_clip_vision(),
            text_config=dict(model_type="llama", **_llama_text(num_hidden_layers=num_layers)),
            image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], image_seq_length=16,
        )
    elif family == "qwen2_5_vl":
        cfg = T.Qwen2_5_VLConfig(
            text_config=dict(
                model_type="qwen2_5_vl_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                fullatt_block_indexes=[1], in_channels=3,
            ),
            image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
            vision_start_token_id=IMAGE_TOKEN + 2, vision_end_token_id=IMAGE_TOKEN + 3,
        )
    elif family == "internvl":
        cfg = T.InternVLConfig(
            vision_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                image_size=[32, 32], patch_size=[4, 4], use_mask_token=False,
            ),
            text_config=dict(
                model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False,
            ),
            image_token_id=IMAGE_TOKEN, image_seq_length=16, downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    elif family == "llava_onevision":
        cfg = T.LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, image_size=32, patch_size=8, vision_use_head=False,
            ),
            text_config=dict(
                model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False,
            ),
            image_token_index=IMAGE_TOKEN, video_token_index=IMAGE_TOKEN + 1,
            image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_2",
        )
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = "eager" if family == "qwen2_5_vl" else attn
    return cfg


MODEL_CLASSES = {
    "llava": T.LlavaForConditionalGeneration,
    "llava_next": T.LlavaNextForConditionalGeneration,
    "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
    "internvl": T.InternVLForConditionalGeneration,
    "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
}


def build_model(family: str, attn: str = "sdpa", seed: int = 0, num_layers: int = 4, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = make_config(family, attn, num_layers)
    model = MODEL_CLASSES[family](cfg).to(dtype).eval()
    # the default init gives near-uniform logits and degenerate greedy text; spread the
    # embeddings and the head so that decoding differs from step to step (a sharper test)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model.embed_tokens" in name:
                p.mul_(10.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    return model


def _image_inputs(family: str, gen: torch.Generator, image_index: int):
    """pixel tensors of one image and its number of visual tokens in the LLM."""
    if family == "llava":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}, 16
    if family == "llava_next":
        # an image of 32x64 -> base tile + 2 tiles (anyres), tokens incl. row newlines
        size = [32, 64] if image_index % 2 == 0 else [64, 32]
        return {"pixel_values": torch.randn(1, 3, 3, 32, 32, generator=gen), "image_sizes": torch.tensor([size])}, None
    if family == "qwen2_5_vl":
        h, w = (8, 8) if image_index % 2 == 0 else (8, 4)  # patches of 4 px, merged 2x2
        n_patches = h * w
        return {
            "pixel_values": torch.randn(n_patches, 3 * 2 * 4 * 4, generator=gen),
            "image_grid_thw": torch.tensor([[1, h, w]]),
        }, n_patches // 4
    if family == "internvl":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=gen)}, 16
    if family == "llava_onevision":
        # 5 tiles, padded as the processor pads to the most tiles any pinpoint takes
        size = ONEVISION_SIZES[image_index % 2]
        return {"pixel_values": torch.randn(1, 5, 3, 32, 32, generator=gen), "image_sizes": torch.tensor([size])}, None
    raise ValueError(family)


def _cat(parts: list[dict]) -> dict:
    out = {}
    for key in parts[0]:
        out[key] = torch.cat([p[key] for p in parts], dim=0)
    return out


def count_llava_next_tokens(model, pixel_values, image_sizes, **kw) -> int:
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **kw)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    return sum(f.shape[0] for f in feats)


def build_inputs(model, family: str, num_images: int = 1, text_len: int = 6, seed: int = 0):
    """input_ids = [bos, text..., (vision tokens, text...) x num_images, text...]."""
    gen = torch.Generator().manual_seed(seed)
    parts, counts = [], []
    for i in range(num_images):
        px, n = _image_inputs(family, gen, i)
        if n is None:
            n = count_llava_next_tokens(model, px["pixel_values"], px["image_sizes"])
        parts.append(px)
        counts.append(n)
    ids = [1] + torch.randint(3, 90, (text_len,), generator=gen).tolist()
    for n in counts:
        if family == "qwen2_5_vl":
            ids += [IMAGE_TOKEN + 2] + [IMAGE_TOKEN] * n + [IMAGE_TOKEN + 3]
        else:
            ids += [IMAGE_TOKEN] * n
        ids += torch.randint(3, 90, (3,), generator=gen).tolist()
    ids += torch.randint(3, 90, (text_len,), generator=gen).tolist()
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if parts:
        px = _cat(parts)
        if family in ("llava_next", "llava_onevision"):
            px["image_sizes"] = torch.cat([p["image_sizes"] for p in parts])
        inputs.update(px)
    return inputs, counts


def prepared_samples(model, family: str, n: int = 3) -> list:
    """``n`` one-image prompts of :func:`build_inputs` (seeds 0..n-1) as the search's
    ``PreparedSample`` (visual counts, text tokens)."""
    from dop.search import PreparedSample  # here: importing this module leaves dop's import order to the tests

    out = []
    for seed in range(n):
        inputs, counts = build_inputs(model, family, num_images=1, seed=seed)
        out.append(PreparedSample(inputs, counts, int(inputs["input_ids"].shape[1]) - sum(counts)))
    return out


PAD = 0


def collate(prompts: list[dict], side: str = "left") -> dict:
    """A padded batch of single-prompt inputs (as `build_inputs` makes them), the way a processor
    pads: input ids padded with PAD on ``side``, attention_mask 0 there, pixel inputs of every
    image in prompt order."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    ids, mask = [], []
    for p in prompts:
        n = p["input_ids"].shape[1]
        pad = torch.full((1, width - n), PAD, dtype=torch.long)
        zeros = torch.zeros((1, width - n), dtype=torch.long)
        if side == "left":
            ids.append(torch.cat([pad, p["input_ids"]], 1))
            mask.append(torch.cat([zeros, p["attention_mask"]], 1))
        else:
            ids.append(torch.cat([p["input_ids"], pad], 1))
            mask.append(torch.cat([p["attention_mask"], zeros], 1))
    batch = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(mask)}
    keys = [k for k in ("pixel_values", "image_sizes", "image_grid_thw", "batch_num_images") if any(k in p for p in prompts)]
    for k in keys:
        batch[k] = torch.cat([p[k] for p in prompts if k in p])
    return batch


def text_only_inputs(text_len: int = 9, seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 90, (text_len,), generator=gen).tolist()
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def with_cache(model, cache) -> dict:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
