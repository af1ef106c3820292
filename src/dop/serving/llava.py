"""LLaVA under vLLM with a dop policy: everything LLaVA-specific of the serving plugin
(docs/serving.md). The class is vLLM's own ``LlavaForConditionalGeneration`` plus

- weight names: checkpoints saved by transformers 5.2x name the CLIP tower's modules
  without ``vision_model.`` (``vision_tower.encoder...``), vLLM's tower has it; the loader
  maps the names as it streams the tensors (no copy on disk);
- with a policy (``additional_config["dop"]``): the ranker orders each image's tokens when
  vLLM encodes the image, and the policy group of each token travels with the image's
  embedding rows through vLLM's encoder cache as one extra column, which
  :meth:`embed_input_ids` strips and hands to the decoder layers (so a chunked prefill
  that splits an image, and a recomputed request, find the groups of exactly the rows they
  run); the decoder layers are dop's pruned layers (:mod:`dop.serving.runtime`).

Without a ``dop`` entry nothing of this runs: the model is vLLM's, call for call.
"""

from __future__ import annotations

import re

import torch
from vllm.config import CompilationMode
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper

from ..models.base import ImageSpan, softmax_attention, vision_layer_index
from ..rankers import resolve_ranker, run_ranker
from ..rankers.base import RankContext
from .options import options_from_additional_config
from .runtime import ServingSession, pruned_llama_layer


class DopLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            # transformers 5.2x: "vision_tower.encoder..." -> vLLM's "vision_tower.vision_model.encoder..."
            re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model.",
        },
        orig_to_new_prefix=LlavaForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix,
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        layers = self.language_model.model.layers
        opts = options_from_additional_config(vllm_config.additional_config, num_layers=len(layers))
        self._dop = None
        if opts is None or not opts.prunes:  # no policy, or one that prunes nothing: vLLM's model
            return
        _check_engine(vllm_config)
        self._dop = ServingSession(opts.policy)
        self._dop_ranker = resolve_ranker(opts.ranker)
        self._dop_view = _TowerView(self)
        self._dop_ranker.install(self, self._dop_view)
        for i, layer in enumerate(layers):
            layer.forward = pruned_llama_layer(layer, i, self._dop)

    # -- the ranker, when vLLM encodes images ----------------------------------------------
    def embed_multimodal(self, **kwargs):
        embeds = super().embed_multimodal(**kwargs)
        if self._dop is None or len(embeds) == 0:
            return embeds
        items = list(embeds)
        n = items[0].shape[0]
        if any(e.shape[0] != n for e in items):
            raise ValueError("dop serving: LLaVA images of different token counts in one batch")
        policy = self._dop.policy
        spans = [ImageSpan(torch.arange(n, device="cpu"), self._dop_view.grid(n), row=i) for i in range(len(items))]
        ctx = RankContext(model=self, adapter=self._dop_view, inputs={}, spans=spans,
                          embeddings=torch.stack(items), n_keep=[policy.n_keep(n)] * len(items))
        group_of_rank = torch.tensor(policy.group_of_rank(n), dtype=torch.long, device="cpu")
        out = []
        for e, perm in zip(items, run_ranker(self._dop_ranker, ctx)):
            group = torch.empty(n, dtype=torch.long, device="cpu")
            group[perm.cpu()] = group_of_rank  # token perm[r] has rank r
            out.append(torch.cat([e, group.to(e.device, e.dtype)[:, None]], dim=1))
        return out

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self._dop is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        groups = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device="cpu")
        if multimodal_embeddings is not None and len(multimodal_embeddings):
            tagged = torch.cat(list(multimodal_embeddings))
            groups[is_multimodal.cpu()] = tagged[:, -1].round().long().cpu()
            multimodal_embeddings = [e[:, :-1] for e in multimodal_embeddings]
        self._dop.set_groups(groups)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self._dop is not None:
            n = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
            self._dop.begin(n, positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds, **kwargs)


class _TowerView:
    """What dop's rankers read of vLLM's CLIP tower (the part of :class:`dop.models.base.Adapter`
    they use): the attention layer the projector's features come out of, and its [CLS]
    attention over the patch tokens."""

    def __init__(self, model: LlavaForConditionalGeneration):
        self.config = model.config
        vc = self.config.vision_config
        f = self.config.vision_feature_layer
        if not isinstance(f, int):
            raise ValueError(f"dop serving: a list vision_feature_layer ({f}) is not supported")
        self._layer = model.vision_tower.vision_model.encoder.layers[vision_layer_index(vc.num_hidden_layers, f)]
        self._side = vc.image_size // vc.patch_size

    def grid(self, n: int):
        return (self._side, self._side) if n == self._side ** 2 else None

    def vision_attention_layer(self):
        return self._layer

    def record_image_inputs(self, record):
        return []

    def vision_token_scores(self, layer, hidden, kwargs, input_of):
        attn = layer.self_attn
        h = layer.layer_norm1(hidden)
        qkv, _ = attn.qkv_proj(h)
        q, k, _ = qkv.chunk(3, dim=-1)
        B, S, _ = h.shape
        heads = attn.num_heads_per_partition
        q = q.reshape(B, S, heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(B, S, heads, attn.head_dim).transpose(1, 2)
        rows = softmax_attention(q, k, attn.scale)[:, :, 0, :].mean(1)
        if getattr(self.config, "vision_feature_select_strategy", "default") == "default":
            rows = rows[:, 1:]
        return rows.reshape(-1)


def _check_engine(vllm_config) -> None:
    """Refuse, in one line each, engine settings under which the pruned model is not exact."""
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ValueError("dop serving: a pruning policy runs the decoder eagerly; start vLLM with --enforce-eager")
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise ValueError("dop serving: a pruning policy needs --tensor-parallel-size 1 and --pipeline-parallel-size 1")
    if vllm_config.quant_config is not None:
        raise ValueError("dop serving: a pruning policy needs an unquantized model")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ValueError("dop serving: a pruning policy needs --kv-cache-dtype auto (holes are marked in the cache)")
    if vllm_config.speculative_config is not None:
        raise ValueError("dop serving: speculative decoding is not supported under a pruning policy")
