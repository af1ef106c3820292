"""Prefill latency of operation pruning vs the unpruned model and vs a shortened sequence.

One run measures, interleaved, medians of repeated prefill forwards of a LLaVA whose decoder
has a ~0.5B width (d=896, 24 layers, 14 heads, 2 KV heads, m=4864; random weights: time does
not depend on them) with 576 visual and 64 text tokens:

  vanilla      the unmodified model
  full         apply_policy with every depth full (the wrapper's overhead)
  pruned       apply_policy with a policy at about 14% of decoder FLOPs
  shortened    the vanilla model on a sequence shortened to the same decoder FLOPs
               (what dense token pruning could at best achieve)

and prints the ratios. `--device cuda --dtype bfloat16 --widths llava-7b` runs the same at
LLaVA-1.5-7B widths on a GPU, timed with CUDA events.

    python benchmarks/prefill.py [--repeats 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers as T

import dop
from dop.flops import count_flops

WIDTHS = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "llava-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),  # smoke tests only
}


def build(widths: str, n_visual: int, dtype, device, attn: str):
    side = int(n_visual**0.5)
    cfg = T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=side * 2, patch_size=2),
        text_config=dict(model_type="llama", vocab_size=1024, max_position_embeddings=4096, **WIDTHS[widths]),
        image_token_index=1000, vision_feature_layer=-1,
    )
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = "sdpa" if attn.startswith("flash") else attn
    with torch.device(device):
        model = T.LlavaForConditionalGeneration(cfg)
    return model.to(dtype).eval(), cfg, side


def policy_table(model, n_visual: int, n_text: int) -> list[tuple[dop.Policy, float]]:
    """DOP-space policies (n_v, D_attn, D_mlp) on a grid, with their decoder FLOPs fraction."""
    L = model.config.text_config.num_hidden_layers
    step = 2 if L > 8 else 1
    table = []
    for n_v in sorted({max(1, round(n_visual * f)) for f in (1 / 9, 1 / 6, 2 / 9, 1 / 4, 1 / 3, 1 / 2)}):
        for da in range(0, L + 1, step):
            for dm in range(0, L + 1, step):
                p = dop.Policy.dop(L, n_v / n_visual, da, dm)
                frac = count_flops(model, p, num_visual_tokens=n_visual, num_text_tokens=n_text).decoder_fraction
                table.append((p, frac))
    return table


def find_policy(model, n_visual: int, n_text: int, target: float, table=None) -> dop.Policy:
    """A DOP-space policy (n_v, D_attn, D_mlp) whose decoder FLOPs are closest to ``target``."""
    table = table if table is not None else policy_table(model, n_visual, n_text)
    return min(table, key=lambda pf: abs(pf[1] - target))[0]


def shortened_tokens(model, n_visual: int, n_text: int, flops: float) -> int:
    """Visual tokens of an unpruned sequence with (closest to) ``flops`` decoder FLOPs."""
    best = min(range(0, n_visual + 1),
               key=lambda n: abs(count_flops(model, None, num_visual_tokens=n, num_text_tokens=n_text).decoder - flops))
    return best


def make_inputs(n_visual: int, n_text: int, side: int, device, dtype, batch: int = 1) -> dict:
    """``batch`` copies of one prompt: text, ``n_visual`` image tokens, text (all the same length)."""
    half = n_text // 2
    ids = [1] + [5] * (half - 1) + [1000] * n_visual + [6] * (n_text - half)
    pixels = torch.randn(1, 3, side * 2, side * 2, device=device, dtype=dtype)
    return {
        "input_ids": torch.tensor([ids] * batch, device=device),
        "attention_mask": torch.ones(batch, len(ids), dtype=torch.long, device=device),
        "pixel_values": pixels.repeat(batch, 1, 1, 1),
    }


def short_inputs(n_visual_kept: int, n_text: int, device, batch: int = 1) -> dict:
    """The shortened sequence: as many tokens as ``n_visual_kept`` visual + ``n_text`` text, no image."""
    n = n_text + n_visual_kept
    return {"input_ids": torch.tensor([[1] + [5] * (n - 1)] * batch, device=device),
            "attention_mask": torch.ones(batch, n, dtype=torch.long, device=device)}


def measure(cases: dict, clock, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each case: one warm-up each, then ``repeats`` interleaved rounds."""
    times = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in cases.items():  # interleaved, so load drifts hit every case alike
                times[k].append(clock(fn))
    return times


def timer(device):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", choices=sorted(WIDTHS), default="0.5b")
    ap.add_argument("--visual", type=int, default=576)
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--target", type=float, default=0.14, help="decoder FLOPs fraction of the pruned policy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1, help="identical prompts per forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, cfg, side = build(args.widths, args.visual, dtype, args.device, args.attn)
    L = cfg.text_config.num_hidden_layers
    n_text = args.text
    inputs = make_inputs(args.visual, n_text, side, args.device, dtype, args.batch_size)
    policy = find_policy(model, args.visual, n_text, args.target)
    pf = count_flops(model, policy, num_visual_tokens=args.visual, num_text_tokens=n_text)
    n_short = shortened_tokens(model, args.visual, n_text, pf.decoder)
    short_ids = short_inputs(n_short, n_text, args.device, args.batch_size)
    full = dop.Policy(L, [0.25, 1.0], {"attn_q": [L, L], "attn_kv": [L, L], "mlp": [L, L]})

    def fwd(x):
        return lambda: model(**x, use_cache=False)

    def with_policy(p):
        def run():
            with dop.apply_policy(model, p, ranker="spatial"):
                model(**inputs, use_cache=False)
        return run

    cases = {"vanilla": fwd(inputs), "full": with_policy(full), "pruned": with_policy(policy),
             "shortened": fwd(short_ids)}
    times = measure(cases, timer(args.device), args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    # ratios of runs taken side by side (one round of the interleaved loop) cancel slow drifts
    paired = {k: statistics.median(a / b for a, b in zip(times["vanilla"], v)) for k, v in times.items()}
    flops_short = count_flops(model, None, num_visual_tokens=n_short, num_text_tokens=n_text)
    short_fraction = flops_short.decoder / pf.decoder_unpruned
    res = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, {args.device}",
        "torch": torch.__version__, "transformers": T.__version__,
        "widths": args.widths, "dtype": args.dtype, "batch_size": args.batch_size, "visual": args.visual, "text": n_text,
        "policy": policy.to_dict(), "policy_decoder_flops_fraction": pf.decoder_fraction,
        "shortened_visual_tokens": n_short, "shortened_decoder_flops_fraction": short_fraction,
        "median_s": med, "min_s": best, "runs_s": times,
        "paired_speedup": paired,
        "min_overhead_full": best["full"] / best["vanilla"] - 1.0,
        "min_speedup_pruned": best["vanilla"] / best["pruned"],
        "min_speedup_shortened": best["vanilla"] / best["shortened"],
        "overhead_full": med["full"] / med["vanilla"] - 1.0,
        "speedup_pruned": med["vanilla"] / med["pruned"],
        "speedup_shortened": med["vanilla"] / med["shortened"],
        "speedup_flops_predicted": 1.0 / pf.decoder_fraction,
    }
    res["pruned_vs_shortened"] = res["speedup_pruned"] / res["speedup_shortened"]
    res["min_pruned_vs_shortened"] = res["min_speedup_pruned"] / res["min_speedup_shortened"]
    print(f"decoder {args.widths} ({L} layers), batch {args.batch_size}, {args.visual} visual + {n_text} text tokens, {args.dtype} on {res['machine']}")
    print(f"policy: n_v={policy.group_bounds(args.visual)[0][1]} D_attn={policy.depth['attn'][0]} "
          f"D_mlp={policy.depth['mlp'][0]}  decoder FLOPs {pf.decoder_fraction:.3f} of unpruned; "
          f"shortened sequence: {n_short} visual tokens ({short_fraction:.3f})")
    for k in cases:
        print(f"  {k:<10} median {med[k] * 1000:8.1f} ms  (runs: {', '.join(f'{t * 1000:.0f}' for t in times[k])})")
    print(f"{'':34}{'medians':>10}{'fastest runs':>14}{'paired runs':>13}")
    print(f"{'overhead of a full policy':<34}{res['overhead_full'] * 100:+9.1f}%{res['min_overhead_full'] * 100:+13.1f}%"
          f"{(1 / paired['full'] - 1) * 100:+12.1f}%")
    print(f"{'speedup, op-pruned':<34}{res['speedup_pruned']:9.2f}x{res['min_speedup_pruned']:13.2f}x"
          f"{paired['pruned']:12.2f}x   (FLOPs predict {res['speedup_flops_predicted']:.2f}x)")
    print(f"{'speedup, shortened sequence':<34}{res['speedup_shortened']:9.2f}x{res['min_speedup_shortened']:13.2f}x"
          f"{paired['shortened']:12.2f}x")
    print(f"{'op-pruned / shortened speedup':<34}{res['pruned_vs_shortened']:10.3f}{res['min_pruned_vs_shortened']:14.3f}"
          f"{paired['pruned'] / paired['shortened']:13.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
