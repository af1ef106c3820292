"""vLLM with dop's plugin against dop's own runtime on the demo (docs/serving.md, "Exactness").

For each policy: vLLM's greedy answers (float32, offline engine, the plugin enabled through
``additional_config``) on the first N ``shapes:test`` prompts against ``dop eval --policy``'s
predictions (its ``--json``), and vLLM's first-token log-probabilities (top 5) against dop's
pruned forward. Prints one line per policy and exits 1 on any differing answer or a
log-probability gap above the tolerance on a sample whose visual tokens the two rankers put
in the same groups. VisPruner's order can flip between near-equal scores when the tower's
float32 rounding differs (vLLM's CLIP kernels are not transformers'); such samples are
counted and their largest gap printed apart (docs/serving.md, "Exactness").

    python scripts/serving_exactness.py --limit 200 --out /tmp/serving-exact

Needs the vllm extra (docs/serving.md, "Installation"). About 1 minute per policy to start an
engine on a 2-core CPU, plus dop eval's own time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# tolerance on first-token log-probabilities: unpruned vLLM and transformers differ by about
# 1e-5 in float32 on the demo (different kernels, summation orders); a pruned forward adds
# gathers and index_add, which are exact, so the same order is expected (docs/serving.md)
TOL = 1e-4


def policies(out: str) -> dict[str, str]:
    """The policies checked: the paper's space at three budgets, a multigroup policy with
    per-layer skips (dop-policy/2), all ranked by VisPruner, and spatial token pruning."""
    from dop import Policy

    made = {
        "dop-nv50-a6-m4": Policy.dop(8, 0.5, 6, 4),
        "dop-nv25-a4-m2": Policy.dop(8, 0.25, 4, 2),
        "dop-nv12-a2-m1": Policy.dop(8, 0.125, 2, 1),
        "multigroup-skips": Policy(8, (0.25, 0.5, 1.0), {"attn_q": [8, 6, 2], "attn_kv": [8, 5, 1], "mlp": [8, 3, 0]},
                                   skip={"attn_kv": [[2], [1, 3], []], "mlp": [[5], [], []]}),
    }
    paths = {}
    for name, p in made.items():
        path = os.path.join(out, f"{name}.json")
        p.replace(ranker="vispruner").to_json(path)
        paths[name] = path
    path = os.path.join(out, "tokens25-spatial.json")
    Policy.token_pruning(8, 0.25).replace(ranker="spatial").to_json(path)
    paths["tokens25-spatial"] = path
    return paths


def dop_eval(policy: str, limit: int, out: str) -> list[str]:
    dest = os.path.join(out, os.path.basename(policy).replace(".json", "-eval.json"))
    cmd = [sys.executable, "-m", "dop.cli", "eval", "--model", "demo", "--data", "shapes:test", "--limit", str(limit),
           "--policy", policy, "--no-baseline", "--no-progress", "--json", dest]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    doc = json.load(open(dest))
    return [s["prediction"] for s in doc["samples"]]


def groups_of(model, inputs, policy, n: int) -> list[int]:
    """dop's policy group of each of the ``n`` visual tokens of a one-image prompt."""
    from dop.runtime import rank_visual_tokens

    perm = rank_visual_tokens(model, dict(inputs), policy.ranker_or(None), n_keep=policy.n_keep(n))[0]
    by_rank, out = policy.group_of_rank(n), [0] * n
    for r, t in enumerate(perm):
        out[t] = by_rank[r]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="", help="comma-separated policy names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from vllm import LLM, SamplingParams

    from dop import Policy, apply_policy
    from dop.demo import build_prompt, demo_dir, load_demo
    from dop.demo.shapes import make_samples

    model, proc = load_demo()
    samples = make_samples("test", args.limit)
    prompts = [build_prompt(proc, s["question"]) for s in samples]
    failed = 0
    for name, path in policies(args.out).items():
        if args.only and name not in args.only.split(","):
            continue
        expected = dop_eval(path, args.limit, args.out)
        llm = LLM(model=str(demo_dir("demo")), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1,
                  additional_config={"dop": {"policy": path}})
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": s["image"]}} for p, s in zip(prompts, samples)],
                            SamplingParams(temperature=0, max_tokens=10, logprobs=5), use_tqdm=False)
        got = [o.outputs[0].text.strip() for o in outs]
        pixels = [proc(images=[s["image"]], text=[p], return_tensors="pt")["pixel_values"] for s, p in zip(samples, prompts)]
        served_groups = llm.apply_model(lambda m: [m.embed_multimodal(pixel_values=pv)[0][:, -1].round().long().tolist()
                                                   for pv in pixels])[0]
        differ = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
        del llm
        policy, gap, flip_gap, flips = Policy.from_json(path), 0.0, 0.0, []
        with torch.no_grad(), apply_policy(model, policy):
            for i, (s, p, o) in enumerate(zip(samples, prompts, outs)):
                inputs = proc(images=[s["image"]], text=[p], return_tensors="pt")
                lp = torch.log_softmax(model(**inputs).logits[0, -1].double(), -1)
                first = o.outputs[0].logprobs[0]
                g = max(abs(first[t].logprob - float(lp[t])) for t in first)
                if groups_of(model, inputs, policy, len(served_groups[i])) == served_groups[i]:
                    gap = max(gap, g)
                else:
                    flips.append(i)
                    flip_gap = max(flip_gap, g)
        ok = not differ and gap <= TOL
        failed += not ok
        print(f"{name}: {len(samples) - len(differ)}/{len(samples)} answers equal to dop eval, "
              f"max first-token log-prob gap {gap:.2e} (tolerance {TOL:g}) over {len(samples) - len(flips)} samples "
              f"ranked alike; {len(flips)} ranked differently {flips[:10]} (max gap {flip_gap:.2e}) "
              f"{'OK' if ok else 'FAIL'}" + (f"; differing answers {differ[:10]}" if differ else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
