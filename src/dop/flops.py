"""Analytic prefill FLOPs of an MLLM, unpruned or under a policy (docs/design.md, "FLOPs").

Two conventions:

``"dop"`` (default)
    2 FLOPs per multiply-add of every matrix product in the decoder's prefill: q/k/v/o
    projections (k and v sized ``num_kv_heads * head_dim``), attention scores and
    attention-weighted values over the full ``n_q x n_kv`` rectangle (as
    ``torch.utils.flop_counter.FlopCounterMode`` counts eager attention), and the gated MLP
    (gate, up, down). Norms, RoPE, softmax and elementwise ops are not counted. Under a
    policy, layer ``l`` has ``n_q`` = text + visual tokens with ``attn_q`` processed,
    ``n_kv`` = text + visual with ``attn_kv``, ``n_mlp`` = text + visual with ``mlp``: q and o
    run over ``n_q`` rows, k and v over ``n_kv`` rows, scores and AV over ``n_q x n_kv``, the
    MLP over ``n_mlp`` rows. ``.total`` adds the vision tower, the projector and the lm_head
    on the last position.

``"paper"``
    The convention of published token-pruning tables (FastV, PDrop, VisPruner, CDPruner):
    multiply-adds (not FLOPs) over the visual tokens only, ``L * (4 n d^2 + 2 n^2 d + 3 n d m)``.
    Under a policy it is applied per layer with that layer's visual counts: the projection
    term as ``2 n_q d^2 + 2 n_kv d^2`` (q, o over the queries; k, v over the keys; the formula
    ignores grouped-query attention, as published), the attention term as ``2 n_q n_kv d``
    and the MLP term as ``3 n_mlp d m``; all three reduce to the formula when the counts
    agree. Text tokens, the vision tower, projector and lm_head are not counted, so
    ``.total == .decoder``.

The model is a preset name (``presets()``), a local checkpoint folder (its ``config.json``
is read, never its weights), a ``transformers`` config, or a model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

from .models import adapter_class_for_config
from .names import bundled_dir, looks_like_path
from .policy import OP_KINDS, Policy

CONVENTIONS = ("dop", "paper")


# ---------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class DecoderArch:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mlp_matrices: int = 3  # gate, up, down (SwiGLU)


@dataclass(frozen=True)
class VisionArch:
    """A vision tower. ``type`` is ``vit`` (fixed tiles: CLIP, InternViT) or ``qwen2_5_vl``."""

    type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    image_size: int = 0  # vit: tile side in pixels
    in_channels: int = 3
    cls_token: bool = False
    mlp_matrices: int = 2
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    window_size: int = 0  # qwen2_5_vl: window side in pixels
    fullatt_layers: tuple[int, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class Arch:
    """What the FLOPs count needs to know about a model."""

    name: str
    decoder: DecoderArch
    vision: VisionArch | None = None
    projector_dims: tuple[int, ...] = ()  # Linear chain applied to each projector input row
    default_visual_tokens: int | None = None
    tokens_per_tile: int | None = None  # visual tokens one vision tile yields (vit towers)
    max_tiles: int = 1
    hub_id: str | None = None
    family: str | None = None


# ---------------------------------------------------------------------- presets
@lru_cache(maxsize=None)
def _preset_files() -> dict[str, str]:
    out = {}
    for entry in resources.files("dop").joinpath("presets").iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = entry.name
    return out


def presets() -> list[str]:
    """Names of the model presets that ship with the package."""
    return sorted(_preset_files())


@lru_cache(maxsize=None)
def load_preset_data(name: str) -> dict[str, Any]:
    """The raw JSON of a preset (architecture, defaults, notes and sources)."""
    key = _preset_key(name)
    if key is None:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(presets())}")
    text = resources.files("dop").joinpath("presets", _preset_files()[key]).read_text("utf-8")
    return json.loads(text)


def _preset_key(name: str) -> str | None:
    files = _preset_files()
    low = name.strip().lower()
    if low in files:
        return low
    for key in files:  # hub ids are aliases ("llava-hf/llava-1.5-7b-hf")
        hub = json.loads(resources.files("dop").joinpath("presets", files[key]).read_text("utf-8")).get("hub_id")
        if hub and hub.lower() == low:
            return key
    return None


def preset_arch(name: str) -> Arch:
    d = load_preset_data(name)
    dec = DecoderArch(**d["decoder"])
    vis = None
    if d.get("vision"):
        v = dict(d["vision"])
        v["fullatt_layers"] = tuple(v.get("fullatt_layers", ()))
        vis = VisionArch(**v)
    vt = d.get("visual_tokens", {})
    return Arch(
        name=d["name"],
        decoder=dec,
        vision=vis,
        projector_dims=tuple(d.get("projector", {}).get("dims", ())),
        default_visual_tokens=vt.get("default"),
        tokens_per_tile=vt.get("per_tile"),
        max_tiles=int(vt.get("max_tiles", 1)),
        hub_id=d.get("hub_id"),
        family=d.get("family"),
    )


# ---------------------------------------------------------------------- from transformers
def _decoder_from_config(tc: Any) -> DecoderArch:
    for req in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(tc, req, None) is None:
            raise ValueError(f"config of type {type(tc).__name__} has no {req}; cannot count decoder FLOPs")
    heads = int(tc.num_attention_heads)
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return DecoderArch(
        num_layers=int(tc.num_hidden_layers),
        hidden_size=int(tc.hidden_size),
        intermediate_size=int(tc.intermediate_size),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        vocab_size=int(getattr(tc, "vocab_size", 0) or 0),
    )


def arch_from_config(config: Any, name: str | None = None) -> Arch:
    """Read an :class:`Arch` from a ``transformers`` config (multimodal or text-only); the
    family's numbers beyond the decoder come from its adapter (``Adapter.flops_layout``)."""
    tc = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    dec = _decoder_from_config(tc)
    family = adapter_class_for_config(config)
    fname = family.family_name(config)
    name = name or getattr(config, "name_or_path", None) or fname or type(config).__name__
    vc = getattr(config, "vision_config", None)
    layout = None if vc is None or vc is tc else family.flops_layout(config, dec.hidden_size)
    if layout is None:  # text-only, or a tower dop cannot read: the decoder only
        return Arch(name=name, decoder=dec, family=fname)
    return Arch(name, dec, VisionArch(**layout["vision"]), tuple(layout["projector_dims"]),
                layout["default_visual_tokens"], layout["tokens_per_tile"], layout["max_tiles"], family=fname)


def arch_from_config_folder(folder: str, name: str) -> Arch:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"checkpoint folder {name!r} has no config.json")
    from transformers import AutoConfig  # heavy: transformers, only to read a checkpoint's config

    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types; one line for the user
        raise ValueError(f"cannot read {os.path.join(folder, 'config.json')}: {e}") from None
    return arch_from_config(cfg, name=name)


def resolve_arch(model: Any) -> Arch:
    """An :class:`Arch` from a preset name, a checkpoint folder, a config or a model."""
    if isinstance(model, Arch):
        return model
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        folder = bundled_dir(text)  # demo, demo-base
        if folder is not None:
            if not (folder / "config.json").is_file():
                raise ValueError(f"the {text} model's config is missing ({folder / 'config.json'})")
            return arch_from_config_folder(str(folder), name=text)
        if _preset_key(text) is not None:
            return preset_arch(text)
        if os.path.isdir(text) or (os.path.isfile(text) and text.endswith(".json")):
            folder = text if os.path.isdir(text) else os.path.dirname(text) or "."
            return arch_from_config_folder(folder, name=text)
        what = "no such checkpoint folder" if looks_like_path(text) else "not a preset"
        raise ValueError(f"unknown model {text!r} ({what}); known presets: {', '.join(presets())}")
    config = getattr(model, "config", None)
    if config is not None and not hasattr(model, "to_dict"):
        return arch_from_config(config)
    if hasattr(model, "to_dict") and hasattr(model, "get_text_config"):  # a transformers config
        return arch_from_config(model)
    raise ValueError(
        f"cannot count FLOPs of a {type(model).__name__}: pass a preset name, a checkpoint "
        "folder, a transformers config or a model"
    )


# ---------------------------------------------------------------------- counting
@dataclass
class FlopsReport:
    """FLOPs of one prefill. All counts are plain integers (FLOPs, or multiply-adds under
    ``convention="paper"``)."""

    model: str
    convention: str
    num_visual_tokens: tuple[int, ...]  # per image
    num_text_tokens: int
    decoder: int
    per_layer: tuple[int, ...]
    decoder_unpruned: int
    vision: int = 0
    projector: int = 0
    lm_head: int = 0
    pruned: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.decoder + self.vision + self.projector + self.lm_head

    @property
    def total_unpruned(self) -> int:
        return self.decoder_unpruned + self.vision + self.projector + self.lm_head

    @property
    def decoder_fraction(self) -> float:
        """Pruned over unpruned decoder FLOPs (1.0 when nothing is pruned)."""
        return self.decoder / self.decoder_unpruned if self.decoder_unpruned else 1.0

    @property
    def total_fraction(self) -> float:
        return self.total / self.total_unpruned if self.total_unpruned else 1.0

    def tflops(self, which: str = "total") -> float:
        """``which`` (``decoder``, ``total``, ``vision``, ``decoder_unpruned`` ...) in units of 1e12."""
        value = getattr(self, which, None)
        if not isinstance(value, (int, float)):
            raise ValueError(f"tflops: unknown field {which!r}")
        return value / 1e12

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_visual_tokens"] = list(self.num_visual_tokens)
        d["per_layer"] = list(self.per_layer)
        d.update(
            total=self.total,
            total_unpruned=self.total_unpruned,
            decoder_fraction=self.decoder_fraction,
            total_fraction=self.total_fraction,
        )
        return d


def _layer_rows(policy: Policy | None, layer: int, kind: str, text: int, visual: Sequence[int]) -> tuple[int, int]:
    """(total rows, visual rows) that op ``kind`` processes at ``layer``."""
    if policy is None:
        v = sum(visual)
    else:
        v = sum(policy.tokens_processed(kind, layer, n) for n in visual)
    return text + v, v


def _decoder_layer_flops(a: DecoderArch, n_q: int, n_kv: int, n_mlp: int) -> int:
    d, hd = a.hidden_size, a.head_dim
    q_width, kv_width = a.num_heads * hd, a.num_kv_heads * hd
    mac = (
        n_q * d * q_width  # q_proj
        + 2 * n_kv * d * kv_width  # k_proj, v_proj
        + n_q * q_width * d  # o_proj
        + 2 * n_q * n_kv * q_width  # scores (QK^T) and attention x values, every query head
        + a.mlp_matrices * n_mlp * d * a.intermediate_size  # gate, up, down
    )
    return 2 * mac


def _paper_layer_macs(a: DecoderArch, n_q: int, n_kv: int, n_mlp: int) -> int:
    d, m = a.hidden_size, a.intermediate_size
    return 2 * n_q * d * d + 2 * n_kv * d * d + 2 * n_q * n_kv * d + 3 * n_mlp * d * m


def _per_layer(a: DecoderArch, policy: Policy | None, text: int, visual: Sequence[int], convention: str) -> list[int]:
    out = []
    for layer in range(a.num_layers):
        rows = {k: _layer_rows(policy, layer, k, text, visual) for k in OP_KINDS}
        if convention == "paper":
            out.append(_paper_layer_macs(a, rows["attn_q"][1], rows["attn_kv"][1], rows["mlp"][1]))
        else:
            out.append(_decoder_layer_flops(a, rows["attn_q"][0], rows["attn_kv"][0], rows["mlp"][0]))
    return out


def _vit_tile_flops(v: VisionArch) -> int:
    patches = (v.image_size // v.patch_size) ** 2
    t = patches + (1 if v.cls_token else 0)
    d, m = v.hidden_size, v.intermediate_size
    embed = patches * v.in_channels * v.patch_size**2 * d
    layer = 4 * t * d * d + 2 * t * t * d + v.mlp_matrices * t * d * m
    return 2 * (embed + v.num_layers * layer)


def _qwen_vision_flops(v: VisionArch, n_tokens: int) -> int:
    p = n_tokens * v.spatial_merge_size**2  # patches of one image
    d, m = v.hidden_size, v.intermediate_size
    embed = p * v.in_channels * v.temporal_patch_size * v.patch_size**2 * d
    window = (v.window_size // v.patch_size) ** 2 if v.window_size else p
    mac = embed
    for layer in range(v.num_layers):
        keys = p if layer in v.fullatt_layers else min(p, window)
        mac += 4 * p * d * d + 2 * p * keys * d + v.mlp_matrices * p * d * m
    return 2 * mac


def _tiles(arch: Arch, n: int, num_tiles: int | None) -> int:
    if num_tiles is not None:
        return num_tiles
    per = arch.tokens_per_tile or n or 1
    return max(1, min(arch.max_tiles, math.ceil(n / per)))


def _image_flops(arch: Arch, n: int, num_tiles: int | None) -> tuple[int, int]:
    """(vision tower, projector) FLOPs of one image with ``n`` visual tokens."""
    v = arch.vision
    proj_rows = 0
    vision = 0
    if v is not None and v.type == "qwen2_5_vl":
        vision = _qwen_vision_flops(v, n)
        proj_rows = n
    elif v is not None:
        tiles = _tiles(arch, n, num_tiles)
        vision = tiles * _vit_tile_flops(v)
        proj_rows = tiles * (arch.tokens_per_tile or n)
    dims = arch.projector_dims
    proj = 2 * proj_rows * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return vision, proj


def count_flops(
    model_or_config_or_preset: Any,
    policy: Policy | str | os.PathLike | None = None,
    *,
    num_visual_tokens: int | Sequence[int] | None = None,
    num_text_tokens: int = 0,
    convention: str = "dop",
    num_images: int = 1,
    num_tiles: int | None = None,
    transfer: bool = False,
) -> FlopsReport:
    """Prefill FLOPs (docs/design.md, "FLOPs") of a model, unpruned or under ``policy``.

    ``num_visual_tokens`` is per image (``None``: the model's typical count); a list gives
    each image its own count. ``num_images`` images of that many tokens are otherwise
    assumed; each image is grouped on its own. ``num_tiles`` overrides how many vision
    tiles each image is encoded as (LLaVA-NeXT, InternVL). A policy for another layer count
    is an error unless ``transfer=True``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    arch = resolve_arch(model_or_config_or_preset)
    a = arch.decoder
    visual = _visual_counts(arch, num_visual_tokens, num_images)
    if not isinstance(num_text_tokens, int) or isinstance(num_text_tokens, bool) or num_text_tokens < 0:
        raise ValueError(f"num_text_tokens: must be a non-negative integer, got {num_text_tokens!r}")
    if policy is not None and not isinstance(policy, Policy):
        policy = Policy.from_json(policy)
    if policy is not None:
        policy = policy.check_layers(a.num_layers, transfer=transfer)
    per_layer = _per_layer(a, policy, num_text_tokens, visual, convention)
    unpruned = per_layer if policy is None else _per_layer(a, None, num_text_tokens, visual, convention)
    report = FlopsReport(
        model=arch.name,
        convention=convention,
        num_visual_tokens=tuple(visual),
        num_text_tokens=num_text_tokens,
        decoder=sum(per_layer),
        per_layer=tuple(per_layer),
        decoder_unpruned=sum(unpruned),
        pruned=policy is not None and not policy.is_unpruned(),
    )
    if convention == "paper":
        report.notes.append("multiply-adds over visual tokens only (published token-pruning convention)")
        return report
    for n in visual:
        vis, proj = _image_flops(arch, n, num_tiles)
        report.vision += vis
        report.projector += proj
    report.lm_head = 2 * a.hidden_size * a.vocab_size
    if arch.vision is None:
        report.notes.append("no vision tower in the config: total counts the decoder and lm_head only")
    return report


def _visual_counts(arch: Arch, num_visual_tokens: Any, num_images: int) -> list[int]:
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 0:
        raise ValueError(f"num_images: must be a non-negative integer, got {num_images!r}")
    if num_visual_tokens is None:
        if arch.default_visual_tokens is None:
            raise ValueError(
                f"num_visual_tokens: {arch.name} has no default visual-token count; pass num_visual_tokens"
            )
        num_visual_tokens = arch.default_visual_tokens
    if isinstance(num_visual_tokens, (list, tuple)):
        counts = list(num_visual_tokens)
    else:
        counts = [num_visual_tokens] * num_images
    for n in counts:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"num_visual_tokens: must be a non-negative integer per image, got {n!r}")
    return counts


def budget_from_tokens(
    preset_or_model: Any,
    n_tokens: int,
    num_visual_tokens: int | None = None,
    *,
    num_images: int = 1,
) -> float:
    """The FLOPs budget "as cheap as keeping ``n_tokens`` visual tokens at every layer", as a
    fraction of the unpruned decoder, in the paper convention (docs/design.md, "FLOPs").

    ``budget_from_tokens("llava-1.5-7b", 64)`` is 0.42 / 3.82 ~= 0.109.
    """
    arch = resolve_arch(preset_or_model)
    n_full = num_visual_tokens if num_visual_tokens is not None else arch.default_visual_tokens
    if n_full is None:
        raise ValueError(f"num_visual_tokens: {arch.name} has no default visual-token count; pass it")
    if not isinstance(n_tokens, int) or not (0 <= n_tokens <= n_full):
        raise ValueError(f"n_tokens: must be an integer in [0, {n_full}], got {n_tokens!r}")
    keep = count_flops(arch, num_visual_tokens=n_tokens, num_images=num_images, convention="paper")
    full = count_flops(arch, num_visual_tokens=n_full, num_images=num_images, convention="paper")
    return keep.decoder / full.decoder if full.decoder else 1.0
