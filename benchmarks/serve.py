"""Prefill under vLLM, unpruned vs a dop policy, same machine, same run (docs/serving.md, "Cost").

For each model and each concurrency C (default 1, 8, 32): C requests (one image each, the
demo's prompt) submitted at once to an offline vLLM engine with ``max_tokens=1``, so the
time until the last of them has its first token is the prefill of the batch: the script
prints that time (``batch TTFT``), prefill throughput (prompt tokens per second) and the
pruned/unpruned time ratio beside the decoder FLOPs ratio (``dop.count_flops``). Repeats
``--repeat`` times and keeps the median. Models:

- ``demo``: the bundled demo (float32, its weights);
- ``7b-width``: a LLaVA-1.5-7B-width decoder (d=4096, m=11008, 32 heads) with
  ``--layers`` layers and a 2-layer CLIP-L-width tower at 336 px (576 visual tokens),
  vLLM's dummy weights, bfloat16 (the demo's tokenizer; the text does not matter for time).

    python benchmarks/serve.py --models demo,7b-width --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def seven_b_width(folder: str, layers: int) -> str:
    """A LLaVA-1.5-7B-width checkpoint folder without weights (vLLM's dummy load format)."""
    from dop.demo import demo_dir

    src = demo_dir("demo")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(src / name, folder)
    cfg = json.load(open(src / "config.json"))
    cfg["dtype"] = "bfloat16"
    cfg["image_seq_length"] = 576
    cfg["vision_feature_layer"] = -2
    cfg["text_config"].update(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                              num_key_value_heads=32, head_dim=128, num_hidden_layers=layers, max_position_embeddings=2048)
    cfg["vision_config"].update(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=2,
                                image_size=336, patch_size=14, projection_dim=768)
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"), indent=2)
    proc = json.load(open(src / "processor_config.json"))
    proc["image_processor"].update(crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336})
    proc["patch_size"] = 14
    json.dump(proc, open(os.path.join(folder, "processor_config.json"), "w"), indent=2)
    return folder


def policy_for(num_layers: int, out: str) -> str:
    """The benchmark's policy: the paper's space, top quarter of VisPruner's ranks kept, their
    attention to half depth and MLP to a quarter (spatial ranking keeps the cost of ranking out)."""
    from dop import Policy

    path = os.path.join(out, f"policy-{num_layers}.json")
    Policy.dop(num_layers, 0.25, max(1, num_layers // 2), max(1, num_layers // 4)).replace(ranker="spatial").to_json(path)
    return path


def measure(model: str, dtype: str, dummy: bool, policy: str | None, concurrency: list[int], repeat: int, prompt, image,
            max_len: int):
    from vllm import LLM, SamplingParams

    extra = {"additional_config": {"dop": {"policy": policy}}} if policy else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=max_len, enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 1},
              gpu_memory_utilization=0.1, max_num_seqs=max(concurrency), max_num_batched_tokens=65536,
              enable_prefix_caching=False, load_format="dummy" if dummy else "auto", **extra)
    sp = SamplingParams(temperature=0, max_tokens=1)
    req = {"prompt": prompt, "multi_modal_data": {"image": image}}
    llm.generate([req], sp, use_tqdm=False)  # warm-up
    rows = {}
    for c in concurrency:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            outs = llm.generate([dict(req) for _ in range(c)], sp, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        rows[c] = (statistics.median(times), tokens)
    del llm
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,7b-width")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the 7b-width model")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    conc = [int(c) for c in args.concurrency.split(",")]

    from transformers import AutoTokenizer

    from dop import Policy, count_flops
    from dop.demo import demo_dir
    from dop.demo.shapes import make_samples

    sample = make_samples("test", 1)[0]
    tmp = tempfile.mkdtemp(prefix="dop-serve-bench-")
    for name in args.models.split(","):
        if name == "demo":
            model, dtype, dummy, layers = str(demo_dir("demo")), "float32", False, 8
        elif name == "7b-width":
            model = seven_b_width(tempfile.mkdtemp(dir=tmp), args.layers)
            dtype, dummy, layers = "bfloat16", True, args.layers
        else:
            raise SystemExit(f"unknown model {name!r}; known: demo, 7b-width")
        tok = AutoTokenizer.from_pretrained(model)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = sample["image"].resize((336, 336)) if name == "7b-width" else sample["image"]
        pol = policy_for(layers, tmp)
        max_len = 512 if name == "demo" else 1024
        base = measure(model, dtype, dummy, None, conc, args.repeat, prompt, image, max_len)
        pruned = measure(model, dtype, dummy, pol, conc, args.repeat, prompt, image, max_len)
        cfg = json.load(open(os.path.join(model, "config.json")))
        n_vis = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
        n_text = base[conc[0]][1] // conc[0] - n_vis
        f_full = count_flops(model, None, num_visual_tokens=n_vis, num_text_tokens=n_text).decoder
        f_pruned = count_flops(model, Policy.from_json(pol), num_visual_tokens=n_vis, num_text_tokens=n_text).decoder
        print(f"\n{name} ({dtype}, {layers} decoder layers, {n_vis} visual + {n_text} text tokens; policy "
              f"{Policy.from_json(pol).describe(n_vis)}); decoder FLOPs ratio pruned/unpruned {f_pruned / f_full:.3f}")
        print("  C | unpruned batch TTFT s | tok/s | pruned batch TTFT s | tok/s | time ratio")
        for c in conc:
            (tb, nt), (tp, _) = base[c], pruned[c]
            print(f"{c:>3} | {tb:>10.3f} | {nt / tb:>8.0f} | {tp:>10.3f} | {nt / tp:>8.0f} | {tp / tb:.3f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
