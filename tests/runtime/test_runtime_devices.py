"""Device, dtype, backends, caches and saving under a policy (docs/design.md, "The runtime")."""

from __future__ import annotations

import inspect

import pytest
import torch

import dop
from dop.models import get_adapter
from dop.runtime.attention import register_varlen_kernel
from device_guard import DeviceGuard
from reference import masked_reference
from tiny_models import FAMILIES, build_inputs, build_model, collate, text_only_inputs


def _pol(L):
    return dop.Policy(L, [0.25, 0.5, 1.0], {"attn_q": [L, 2, 1], "attn_kv": [L, 1, 0], "mlp": [L, 3, 0]})


def _skip_pol(L):
    """_pol with per-layer holes (docs/design.md, "Per-layer skips"), keys included."""
    return _pol(L).with_skip(attn_q=[[1], [0], []], attn_kv=[[2, 3], [], []], mlp=[[0, 2], [1], []])


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("ranker", ["random", "spatial", "vispruner", "cdpruner", "fastv:K=1", "dart:K=1"])
@torch.no_grad()
def test_no_tensor_without_a_device(fam, ranker):
    """Pruned prefill and decoding, batched, under the guard: dop never relies on the default device."""
    model = build_model(fam)
    a, _ = build_inputs(model, fam, num_images=2)
    b, _ = build_inputs(model, fam, num_images=1, text_len=3, seed=2)
    batch = collate([a, text_only_inputs(), b], "left")
    L = get_adapter(model).num_layers
    pol = dop.Policy(L, [0.5, 1.0], {"attn": [L, 2], "mlp": [L, 1]}, skip={"mlp": [[2], []], "attn_q": [[3], [1]]})
    guard = DeviceGuard()
    with dop.apply_policy(model, pol, ranker=ranker), guard:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert guard.checked > 0


def test_device_guard_catches_a_planted_factory(monkeypatch):
    """The guard above can fail: plant a device-less arange in the runtime and watch it trip."""
    from dop.runtime import session

    model = build_model("llava")
    inputs, _ = build_inputs(model, "llava")
    original = session.ForwardState.__post_init__
    # the planted line is compiled as if it stood in dop/runtime/session.py
    code = "def planted(self):\n    original(self)\n    self.columns = self.past + torch.arange(self.n_new)\n"
    ns = {"original": original, "torch": torch}
    exec(compile(code, session.__file__, "exec"), ns)
    planted = ns["planted"]
    monkeypatch.setattr(session.ForwardState, "__post_init__", planted)
    with dop.apply_policy(model, _pol(4), ranker="random"), DeviceGuard():
        with pytest.raises(AssertionError, match=r"torch.arange and no device= at runtime.session\.py"):
            model(**inputs)


def _double(inputs):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


def _reference(model, inputs, pd, counts, perms):
    """Logits of the slow masked reference (tests/reference.py) of policy dict ``pd``."""
    adapter = get_adapter(model)
    with masked_reference(model, adapter.decoder_layers(), adapter.entry_module(),
                          adapter.image_token_id, pd, counts, perms):
        return model(**inputs, use_cache=False).logits


def _perms(counts, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).tolist() for n in counts]


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_bfloat16_pruned_equals_masked_reference(fam):
    """bf16 runs pruned; its distance to the masked reference is of the size of bf16's own error.

    The tolerance comes from the unpruned model: its bf16-vs-float64 logit error on the same
    inputs, times 4 (the pruned model computes fewer, differently grouped sums)."""
    model64 = build_model(fam).double()
    inputs, counts = build_inputs(model64, fam, num_images=2)
    inputs64 = _double(inputs)
    model16 = build_model(fam).to(torch.bfloat16)
    inputs16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    adapter = get_adapter(model64)
    L = adapter.num_layers
    own_error = (model16(**inputs16).logits.double() - model64(**inputs64).logits).abs().max().item()
    tol = 4 * own_error
    pd = {"format": "dop-policy/1", "num_layers": L, "groups": [0.25, 0.5, 1.0],
          "depth": {"attn_q": [L, 2, 1], "attn_kv": [L, 1, 0], "mlp": [L, 3, 0]}}
    perms = _perms(counts, 0)
    ref = _reference(model64, inputs64, pd, counts, perms)
    with dop.apply_policy(model16, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
        out = model16(**inputs16).logits
    assert out.dtype == torch.bfloat16
    diff = (out.double() - ref).abs().max().item()
    vanilla_move = (ref - model64(**inputs64).logits).abs().max().item()
    print(f"{fam}: bf16 pruned vs float64 reference {diff:.3g}; bf16's own error {own_error:.3g}; "
          f"the policy moves logits by {vanilla_move:.3g}")
    assert diff <= tol, f"{fam}: bf16 pruned differs from the reference by {diff:.3g} > {tol:.3g}"
    assert vanilla_move > tol, "the policy must move the logits by more than the tolerance, else the check is empty"


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """A pure-PyTorch stand-in with flash-attention's variable-length signature and layout:
    q (total_q, H, hd), k/v (total_k, Hkv, hd); causal aligned bottom-right."""
    calls.append(int(cu_q.numel()) - 1)
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for i in range(cu_q.numel() - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        qi = q[a:b].transpose(0, 1)
        ki = k[c:d].repeat_interleave(rep, dim=1).transpose(0, 1)
        vi = v[c:d].repeat_interleave(rep, dim=1).transpose(0, 1)
        s = (qi @ ki.transpose(-1, -2)) * softmax_scale
        if causal:
            nq, nk = b - a, d - c
            allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            s = s.masked_fill(~allowed, float("-inf"))
        out[a:b] = (torch.softmax(s, -1) @ vi).transpose(0, 1)
    return out


calls: list[int] = []


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_variable_length_kernel_plumbing(fam):
    """A model whose attention implementation has a variable-length kernel (as flash-attention 2)
    runs pruned and exact: the kernel where query and key rows coincide, SDPA with a mask elsewhere."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("dop_test_varlen", sdpa_attention_forward)  # the unpruned layers
    register_varlen_kernel("dop_test_varlen", _varlen_reference)
    try:
        model = build_model(fam).double()
        for cfg in (model.config, model.config.text_config):
            cfg._attn_implementation = "dop_test_varlen"
        a, counts = build_inputs(model, fam, num_images=2)
        adapter = get_adapter(model)
        L = adapter.num_layers
        pd = {"format": "dop-policy/1", "num_layers": L, "groups": [0.5, 1.0],
              "depth": {"attn": [L, 2], "mlp": [L, 1]}}
        perms = _perms(counts, 1)
        inputs = _double(a)
        ref = _reference(model, inputs, pd, counts, perms)
        calls.clear()
        with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
            out = model(**inputs).logits
        assert calls, "the variable-length kernel was never called"
        assert (out - ref).abs().max().item() < 1e-6
        # a batch: the kernel gets one sequence per row (cumulative lengths)
        b, _ = build_inputs(model, fam, num_images=1, text_len=3, seed=2)
        batch = collate([inputs, _double(b)], "left")
        calls.clear()
        with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker="random"):
            single = [model(**p).logits[0] for p in (inputs, _double(b))]
            batched = model(**batch).logits
        assert max(calls) == 2
        for row, s in enumerate(single):
            assert (batched[row, -s.shape[0]:] - s).abs().max().item() < 1e-6
    finally:
        register_varlen_kernel("dop_test_varlen")


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_state_dict_and_save_pretrained_unchanged_while_applied(fam, tmp_path):
    from dop.models import model_class_for

    model = build_model(fam)
    inputs, _ = build_inputs(model, fam)
    before = model.state_dict()
    vanilla = model(**inputs).logits
    with dop.apply_policy(model, _pol(get_adapter(model).num_layers), ranker="random"):
        during = model.state_dict()
        assert list(during) == list(before)
        assert all(torch.equal(during[k], before[k]) for k in before)
        names = [n for n, _ in model.named_parameters()]
        assert not any("base_layer" in n for n in names)
        model.save_pretrained(tmp_path)
    loaded = model_class_for(model.config).from_pretrained(tmp_path).eval()
    reloaded = loaded.state_dict()
    assert set(reloaded) == set(before) and all(torch.equal(reloaded[k], before[k]) for k in before)
    assert torch.allclose(loaded(**inputs).logits, vanilla, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_inputs_embeds_are_pruned_like_input_ids(fam):
    model = build_model(fam).double()
    inputs, _ = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = dict(inputs, inputs_embeds=embeds)
    del by_embeds["input_ids"]
    L = get_adapter(model).num_layers
    with dop.apply_policy(model, _pol(L), ranker="random"):
        a = model(**inputs).logits
        b = model(**by_embeds).logits
    assert (a - b).abs().max().item() < 1e-6
    assert (model(**by_embeds).logits - b).abs().max().item() > 1e-3  # and it was pruned


@torch.no_grad()
def test_inputs_embeds_without_image_rows_is_a_clear_error():
    model = build_model("llava")
    inputs, _ = build_inputs(model, "llava")
    embeds = torch.randn(1, inputs["input_ids"].shape[1], model.config.text_config.hidden_size)
    with dop.apply_policy(model, _pol(4)):
        with pytest.raises(ValueError, match="cannot find the image positions"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_static_cache_generation_equals_dynamic(fam):
    model = build_model(fam).double()
    inputs, _ = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    L = get_adapter(model).num_layers
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for pol in (_pol(L), _skip_pol(L)):
        with dop.apply_policy(model, pol, ranker="random"):
            dyn = model.generate(**inputs, **kw)
            static = model.generate(**inputs, cache_implementation="static", **kw)
        assert torch.equal(dyn.sequences, static.sequences)
        for a, b in zip(dyn.logits, static.logits):
            assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_hidden_states_for_every_layer(fam):
    model = build_model(fam)
    inputs, _ = build_inputs(model, fam)
    L = get_adapter(model).num_layers
    layers = get_adapter(model).decoder_layers()
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)) for layer in layers]
    try:
        with dop.apply_policy(model, _pol(L), ranker="random"):
            out = model(**inputs, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(out.hidden_states) == L + 1
    for i in range(1, L):  # the input of layer i is what the pruned layer i - 1 returned
        assert torch.equal(out.hidden_states[i], seen[i - 1])


@pytest.mark.parametrize("fam", ["llava"])  # compiling takes a while on CPU; one family shows the path
@pytest.mark.parametrize("pruning", [True, False], ids=["prune", "noop"])
@torch.no_grad()
def test_compiled_decoding_full_graph_without_recompiles(fam, pruning):
    """generate() with a static cache compiles the decoding steps with fullgraph=True; under a
    policy they trace once (a second generation must not recompile) and equal eager decoding."""
    from transformers import CompileConfig

    torch.compiler.reset()
    model = build_model(fam)
    inputs, _ = build_inputs(model, fam, num_images=1)
    L = get_adapter(model).num_layers
    pol = dop.Policy(L, [0.5, 1.0], {"attn": [L, 2], "mlp": [L, 2]} if pruning else {"attn": [L, L], "mlp": [L, L]})
    if pruning:  # holes below the depths too: the static cache keeps them as holes
        pol = pol.with_skip(attn_kv=[[1], []], mlp=[[0, 3], [1]])
    cc = CompileConfig(fullgraph=True, dynamic=False)
    cc._compile_all_devices = True  # compile on CPU too
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    other["input_ids"][0, 1] = 7  # same shape, other text
    with dop.apply_policy(model, pol, ranker="random"):
        with torch.compiler.set_stance("force_eager"):
            eager = [model.generate(**x, **kw) for x in (inputs, other)]
        first = model.generate(**inputs, cache_implementation="static", compile_config=cc, **kw)
        with torch.compiler.set_stance("fail_on_recompile"):
            second = model.generate(**other, cache_implementation="static", compile_config=cc, **kw)
    assert hasattr(model, "_compiled_call")
    for e, c in zip(eager, (first, second)):
        assert torch.equal(e.sequences, c.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(e.scores, c.scores)) < 1e-4


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_attentions_for_every_layer(fam):
    """output_attentions under a policy: one (B, heads, S, S) map per layer; skipped queries'
    rows and skipped keys' columns are zero, kept rows sum to 1; a layer where nothing is
    skipped gives the unpruned model's own map."""
    model = build_model(fam, attn="eager").double()
    inputs, counts = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    L = get_adapter(model).num_layers
    vanilla = model(**inputs, output_attentions=True).attentions
    pol = dop.Policy(L, [0.5, 1.0], {"attn_q": [L, 2], "attn_kv": [L, 1], "mlp": [L, 1]})
    with dop.apply_policy(model, pol, ranker="random"):
        out = model(**inputs, output_attentions=True).attentions
    S = inputs["input_ids"].shape[1]
    assert len(out) == L and all(a.shape == (1, vanilla[0].shape[1], S, S) for a in out)
    assert (out[0] - vanilla[0]).abs().max().item() < 1e-10  # layer 0 skips nothing
    rows = out[2].sum(-1)[0, 0]
    n_zero_rows = int((rows == 0).sum())
    assert n_zero_rows == sum(n - int(0.5 * n + 1e-9) for n in counts)  # attn_q skipped from layer 2
    assert torch.allclose(rows[rows != 0], torch.ones_like(rows[rows != 0]))
    cols = out[1][0, 0].sum(0)
    assert int((cols == 0).sum()) == sum(n - int(0.5 * n + 1e-9) for n in counts)  # attn_kv skipped from layer 1
    # per-layer skips: group 1's keys are missing at layer 1 only, its queries at layer 2 only
    holes = dop.Policy(L, [0.5, 1.0], {}, skip={"attn_kv": [[], [1]], "attn_q": [[], [2]]})
    with dop.apply_policy(model, holes, ranker="random"):
        out = model(**inputs, output_attentions=True).attentions
    n_group1 = sum(n - int(0.5 * n + 1e-9) for n in counts)
    zero_rows = [int((out[l][0, 0].sum(-1) == 0).sum()) for l in range(L)]
    zero_cols = [int((out[l][0, 0].sum(0) == 0).sum()) for l in range(L)]
    assert zero_rows == [0, 0, n_group1, 0] and zero_cols == [0, n_group1, 0, 0]



@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_attention_maps_carry_the_computation(fam):
    """With output_attentions the pruned layers compute their output from the reported maps:
    the logits are those of the kernel path, and gradients reach the maps (transformers'
    retain-grad test)."""
    model = build_model(fam, attn="eager").double()
    inputs, _ = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    L = get_adapter(model).num_layers
    pol = dop.Policy(L, [0.5, 1.0], {"attn_q": [L, 2], "attn_kv": [L, 1], "mlp": [L, 1]})
    with dop.apply_policy(model, pol, ranker="random"):
        with torch.no_grad():
            plain = model(**inputs).logits
        out = model(**inputs, output_attentions=True)
        assert (out.logits - plain).abs().max().item() < 1e-10
        maps = out.attentions
        for m in maps:
            m.retain_grad()
        out.logits[0, -1].sum().backward()
    assert all(m.grad is not None for m in maps[1:])


@pytest.mark.parametrize("fam", ["llava", "llava_next", "internvl"])  # transformers has no flex path for Qwen2.5-VL
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")  # transformers' own call
@torch.no_grad()
def test_flex_attention_model_runs_pruned_and_exact(fam):
    """A model loaded with attn_implementation='flex_attention' runs pruned: masked layers go
    through SDPA with a boolean mask (docs/design.md, "Attention backends")."""
    model = build_model(fam, attn="flex_attention")  # float32: flex has no float64 kernel on CPU
    inputs, counts = build_inputs(model, fam, num_images=2)
    adapter = get_adapter(model)
    L = adapter.num_layers
    pd = {"format": "dop-policy/1", "num_layers": L, "groups": [0.5, 1.0], "depth": {"attn": [L, 2], "mlp": [L, 1]}}
    perms = _perms(counts, 0)
    ref = _reference(model, inputs, pd, counts, perms)
    with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
        out = model(**inputs).logits
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert (out - ref).abs().max().item() < 1e-5


@torch.no_grad()
def test_a_layer_that_holds_no_key_at_all():
    """A prompt of image tokens only, whose keys are all skipped from layer 1 while their
    queries are kept: those queries see no key and get no update (found by the conformance run)."""
    model = build_model("llava").double()
    inputs, counts = build_inputs(model, "llava", num_images=1, text_len=0)
    n = counts[0]
    ids = inputs["input_ids"][:, 1:1 + n]  # the image tokens alone
    inputs = _double(dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids)))
    adapter = get_adapter(model)
    L = adapter.num_layers
    pd = {"format": "dop-policy/1", "num_layers": L, "groups": [1.0], "depth": {"attn_q": [L], "attn_kv": [1], "mlp": [L]}}
    perms = [list(range(n))]
    ref = _reference(model, inputs, pd, counts, perms)
    with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
        out = model(**inputs).logits
        maps = model(**inputs, output_attentions=True).attentions
    assert (out - ref).abs().max().item() < 1e-6
    assert len(maps) == L and all(float(m.abs().sum()) == 0 for m in maps[1:])  # no key: an all-zero map


@torch.no_grad()
def test_text_generation_from_embeddings_is_not_taken_for_images():
    """generate() passes an empty dict of encoder outputs with text-only embeddings: no image,
    nothing pruned, no error (found by the conformance run)."""
    model = build_model("llava")
    ids = text_only_inputs()["input_ids"]
    embeds = torch.rand(1, ids.shape[1], model.config.text_config.hidden_size)
    with torch.no_grad():
        vanilla = model.generate(ids, inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    with dop.apply_policy(model, _pol(4), ranker="random"):
        pruned = model.generate(ids, inputs_embeds=embeds, max_new_tokens=3, do_sample=False)
    assert torch.equal(vanilla, pruned)


@torch.no_grad()
def test_image_token_count_mismatch_is_the_models_own_error():
    """Pixel inputs that do not fit the image tokens: transformers' own error, not an IndexError of dop."""
    model = build_model("qwen2_5_vl")
    inputs, _ = build_inputs(model, "qwen2_5_vl", num_images=2)
    bad = dict(inputs, image_grid_thw=inputs["image_grid_thw"][:1], pixel_values=inputs["pixel_values"][:64])
    with pytest.raises(ValueError) as vanilla:
        model(**bad)
    with dop.apply_policy(model, _pol(4), ranker="random"):
        with pytest.raises(ValueError) as pruned:
            model(**bad)
    assert str(pruned.value) == str(vanilla.value)


@pytest.mark.parametrize("fam", ["llava", "internvl"])
@torch.no_grad()
def test_assisted_decoding_and_a_hand_written_decoding_loop(fam):
    """Prompt-lookup (assisted) decoding crops the cache; a hand-written loop lets the model
    derive positions from the cache's length. Both equal greedy decoding under the policy
    (found by the conformance run)."""
    model = build_model(fam).double()
    inputs, _ = build_inputs(model, fam, num_images=2)
    inputs = _double(inputs)
    L = get_adapter(model).num_layers
    with dop.apply_policy(model, _pol(L), ranker="spatial"):
        greedy = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=2)
        out = model(**inputs, use_cache=True)
        cache, tokens = out.cache if hasattr(out, "cache") else out.past_key_values, [int(out.logits[0, -1].argmax())]
        # the forward's cache argument: `cache` from transformers 5.24, `past_key_values` before
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for _ in range(5):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), **{cache_name: cache}, use_cache=True)
            tokens.append(int(step.logits[0, -1].argmax()))
    assert torch.equal(assisted, greedy)
    assert tokens == greedy[0, -6:].tolist()
