"""dop's vLLM plugin on the bundled demo (docs/serving.md): vLLM's own engine, offline, in
this process, against dop's transformers runtime (the same policy through ``apply_policy``).
Skipped when vLLM is not installed (the vllm extra in its own environment; .ci/run installs
it unless DOP_CI_VLLM=0). Each engine takes about 30-60 s to start on a 2-core CPU."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (the vllm extra: bash scripts/install_vllm_env.sh; docs/serving.md)",
)

TOL = 1e-4  # first-token log-probabilities, float32 (docs/serving.md, "Exactness")
NEW = 6
# a dop-policy/2 policy of the demo's 8 layers with per-layer skips of every kind
SKIPS = {"format": "dop-policy/2", "num_layers": 8, "groups": [0.25, 0.5, 1.0],
         "depth": {"attn_q": [8, 6, 2], "attn_kv": [8, 5, 1], "mlp": [8, 3, 0]},
         "skip": {"attn_kv": [[2], [1, 3], []], "mlp": [[5], [], []]}, "ranker": "vispruner"}


@pytest.fixture(scope="module")
def demo():
    from dop.demo import build_prompt, load_demo
    from dop.demo.shapes import make_samples

    model, proc = load_demo()
    samples = make_samples("test", 3)
    text_only = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "is there a red circle ?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    reqs = [{"prompt": build_prompt(proc, s["question"]), "multi_modal_data": {"image": s["image"]}} for s in samples]
    # a mixed batch: three images, a text-only prompt, the first prompt again (prefix cache)
    reqs = reqs + [{"prompt": text_only}, dict(reqs[0])]
    return model, proc, reqs


def _engine(policy_path=None, **kw):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from dop.demo import demo_dir

    extra = {"additional_config": {"dop": {"policy": str(policy_path)}}} if policy_path else {}
    return LLM(model=str(demo_dir("demo")), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
               limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1, **extra, **kw)


def _generate(llm, reqs, one_by_one=False):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=NEW, logprobs=5)
    if one_by_one:  # later requests then find the earlier ones' blocks in the prefix cache
        return [llm.generate([r], sp, use_tqdm=False)[0] for r in reqs]
    return llm.generate(reqs, sp, use_tqdm=False)


def _reference(model, proc, req, policy):
    """dop's own runtime: greedy answer and first-token log-probabilities."""
    import torch

    from dop import apply_policy

    images = [req["multi_modal_data"]["image"]] if "multi_modal_data" in req else None
    inputs = proc(images=images, text=[req["prompt"]], return_tensors="pt")
    with torch.no_grad(), apply_policy(model, policy):
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        lp = torch.log_softmax(model(**inputs).logits[0, -1].double(), -1)
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), lp


def _check_against_dop(demo, outs, policy):
    model, proc, reqs = demo
    for req, o in zip(reqs, outs):
        text, lp = _reference(model, proc, req, policy)
        assert o.outputs[0].text.strip() == text.strip()
        first = o.outputs[0].logprobs[0]
        assert max(abs(first[t].logprob - float(lp[t])) for t in first) < TOL


@pytest.fixture(scope="module")
def skips_policy(tmp_path_factory):
    from dop import Policy

    path = tmp_path_factory.mktemp("pol") / "skips.json"
    path.write_text(json.dumps(SKIPS))
    return path, Policy.from_json(str(path))


def test_policy_with_skips_mixed_batch_chunked_prefill_and_prefix_cache(demo, skips_policy):
    """One engine that splits each image over prefill chunks (64-token steps), runs a mixed
    batch, then the same prompts one by one (the repeated prompt reads its blocks, holes
    included, from the prefix cache): every answer and first-token distribution equals dop's."""
    path, policy = skips_policy
    llm = _engine(path, max_num_batched_tokens=64, enable_chunked_prefill=True, enable_prefix_caching=True)
    try:
        batch = _generate(llm, demo[2])
        _check_against_dop(demo, batch, policy)
        alone = _generate(llm, demo[2], one_by_one=True)
        _check_against_dop(demo, alone, policy)
        assert alone[-1].num_cached_tokens > 0  # the repeated prompt was served from the prefix cache
    finally:
        del llm


def test_noop_policy_is_bit_equal_to_vllm(demo, tmp_path):
    from dop import Policy

    path = tmp_path / "noop.json"
    Policy.unpruned(8, [0.5, 1.0]).replace(ranker="vispruner").to_json(str(path))
    runs = []
    for p in (None, path):
        llm = _engine(p)
        try:
            runs.append(_generate(llm, demo[2]))
        finally:
            del llm
    for a, b in zip(*runs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [{t: x.logprob for t, x in step.items()} for step in a.outputs[0].logprobs] == \
               [{t: x.logprob for t, x in step.items()} for step in b.outputs[0].logprobs]


@pytest.mark.parametrize("content, ranker, message", [
    ('{"format": "dop-policy/1", "num_layers": 8, "groups": [0.5, 1.0], "depth": {"attn": [8, 9]}}', None, "depth"),
    ('{"format": "dop-policy/1", "num_layers": 4, "groups": [1.0], "depth": {"mlp": [2]}}', None, "num_layers"),
    ('{"format": "dop-policy/1", "num_layers": 8, "groups": [0.5, 1.0], "depth": {"mlp": [8, 2]}}', "fastv", "fastv"),
    ('{"format": "dop-policy/1", "num_layers": 8, "groups": [0.5, 1.0], "depth": {"mlp": [8, 2]}}', "nosuch", "nosuch"),
    ("not json", None, "policy"),
])
def test_bad_policies_are_refused_before_the_engine_starts(tmp_path, content, ranker, message):
    from dop.serving import options_from_additional_config

    path = tmp_path / "p.json"
    path.write_text(content)
    entry = {"policy": str(path), **({"ranker": ranker} if ranker else {})}
    with pytest.raises(ValueError, match=message):
        options_from_additional_config({"dop": entry}, num_layers=8)


def test_unknown_option_and_missing_file(tmp_path):
    from dop.serving import options_from_additional_config

    assert options_from_additional_config({}) is None
    with pytest.raises(ValueError, match="unknown option"):
        options_from_additional_config({"dop": {"policy": "p.json", "depth": 3}})
    with pytest.raises(ValueError, match="no such file"):
        options_from_additional_config({"dop": {"policy": str(tmp_path / "missing.json")}})


def test_pruning_policy_needs_enforce_eager(skips_policy):
    path, _ = skips_policy
    with pytest.raises(Exception, match="enforce-eager"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from dop.demo import demo_dir

        LLM(model=str(demo_dir("demo")), dtype="float32", max_model_len=512, enforce_eager=False,
            gpu_memory_utilization=0.1, additional_config={"dop": {"policy": str(path)}})
