"""The slow masked reference of docs/design.md ("What skipping means"), written independently of the runtime.

Every token goes through every module; a skipped attention query gets its update zeroed, a
skipped key is masked out of every query, a skipped MLP update is zeroed. Decoding recomputes
the whole sequence at each step (no KV cache), generated tokens being ordinary text tokens.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch


def token_flags(policy: dict, perms: list[list[int]], counts: list[int]):
    """Per image: bool tensors (n, L) for attn_q, attn_kv, mlp, straight from docs/design.md,
    "Policies" and "Per-layer skips": processed at ``l`` iff ``l < depth`` and ``l`` not skipped."""
    L = policy["num_layers"]
    fr = policy["groups"]
    depth = policy.get("depth", {})
    skip = policy.get("skip", {})

    def kind_entry(table, kind, g, default):
        if kind in table:
            return table[kind][g]
        if kind in ("attn_q", "attn_kv") and "attn" in table:
            return table["attn"][g]
        return default

    def kind_depth(kind, g):
        return kind_entry(depth, kind, g, L)

    out = []
    for perm, n in zip(perms, counts):
        flags = {k: torch.zeros(n, L, dtype=torch.bool) for k in ("attn_q", "attn_kv", "mlp")}
        for r, tok in enumerate(perm):
            g = 0
            while not (r < math.floor(fr[g] * n + 1e-9)):
                g += 1
            for k in flags:
                flags[k][tok, : kind_depth(k, g)] = True
                for layer in kind_entry(skip, k, g, []):
                    flags[k][tok, layer] = False
        out.append(flags)
    return out


def _family_rotary(attn):
    """The rotation the family's own attention applies to what its layer receives: the plain
    ``apply_rotary_pos_emb``, or (Qwen2.5-VL before transformers 5.17) the multimodal one that
    merges the mrope sections of (3, B, S, head_dim) cos/sin itself."""
    module = sys.modules[type(attn).__module__]
    if hasattr(module, "apply_rotary_pos_emb"):
        return module.apply_rotary_pos_emb
    section = attn.config.rope_parameters["mrope_section"]
    return lambda q, k, cos, sin: module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, section)


class _RefLayer(torch.nn.Module):
    def __init__(self, base, idx, ctx):
        super().__init__()
        self.base, self.idx, self.ctx = base, idx, ctx
        self.rotary = _family_rotary(base.self_attn)

    def forward(self, h, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kw):
        attn, l = self.base.self_attn, self.idx
        S = h.shape[1]
        q_ok, kv_ok, m_ok = (self.ctx.flag(k, l, S) for k in ("attn_q", "attn_kv", "mlp"))
        hn = self.base.input_layernorm(h)
        shape = (1, S, -1, attn.head_dim)
        q = attn.q_proj(hn).view(shape).transpose(1, 2)
        k = attn.k_proj(hn).view(shape).transpose(1, 2)
        v = attn.v_proj(hn).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        allowed = torch.tril(torch.ones(S, S, dtype=torch.bool)) & kv_ok[None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        empty = ~allowed.any(-1)
        probs = torch.softmax(scores.masked_fill(empty[:, None], 0.0), dim=-1)
        probs = probs.masked_fill(empty[:, None], 0.0)
        o = (probs @ v).transpose(1, 2).reshape(1, S, -1)
        o = attn.o_proj(o) * q_ok[None, :, None].to(h.dtype)
        h = h + o
        m = self.base.mlp(self.base.post_attention_layernorm(h)) * m_ok[None, :, None].to(h.dtype)
        return h + m


class _Ctx:
    def __init__(self, image_token, policy, perms_fn):
        self.image_token, self.policy, self.perms_fn = image_token, policy, perms_fn
        self.input_ids = None

    def hook(self, module, args, kwargs):
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)

    def flag(self, kind, layer, S):
        ids = self.input_ids[0]
        ok = torch.ones(S, dtype=torch.bool)
        pos = torch.nonzero(ids == self.image_token).flatten()
        counts, perms = self.perms_fn()
        flags = token_flags(self.policy, perms, counts)
        start = 0
        for n, f in zip(counts, flags):
            ok[pos[start:start + n]] = f[kind][:, layer]
            start += n
        assert start == pos.numel(), "image token count does not match the reference's counts"
        return ok


@contextlib.contextmanager
def masked_reference(model, layers, entry, image_token, policy: dict, counts, perms):
    """Make ``model`` compute the masked reference of ``policy`` with fixed per-image ranks."""
    ctx = _Ctx(image_token, policy, lambda: (counts, perms))
    originals = list(layers)
    hook = entry.register_forward_pre_hook(ctx.hook, with_kwargs=True)
    for i, layer in enumerate(originals):
        layers[i] = _RefLayer(layer, i, ctx)
    try:
        yield
    finally:
        hook.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def reference_greedy(model, inputs: dict, max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache)."""
    ids = inputs["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        step = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = model(**step, use_cache=False).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
