"""Cost model of the DOP search's divergence table on 7B models, per number of GPUs.

    time = ceil(samples / GPUs) x (decoder-layer evaluations per sample) x (time of one layer)

- Layer evaluations per sample: :func:`dop.search.table.layer_evals_per_sample` with
  ``value_batch=1``, the count ``build_table`` adds up when every entry has a forward of its
  own (one unpruned forward, the ranker's probe, then every table entry from the first layer
  it changes), for the space laid out at the preset's visual tokens: one evaluation is one
  sequence through one layer. The default table batches entries (docs/design.md, "Table
  cost"): fewer layer calls, the same sequences, so this count still prices the work.
- Time of one layer: with ``--prefill-json`` (the output of ``benchmarks/prefill.py --device
  cuda --dtype bfloat16 --widths llava-7b --json prefill.json`` on the GPU in question), the
  unpruned prefill's median divided by the layer count: measured. Without it: the layer's
  decoder FLOPs (``dop.count_flops``) at ``--tflops`` sustained TFLOP/s: an ESTIMATE. Either way
  the unpruned layer's time is used for every layer evaluation, an upper bound (pruned
  entries process fewer rows). The vision tower, loading and the solver are left out.
- Samples are shared among the GPUs (docs/scaling.md), so a GPU runs ``ceil(n / W)``
  samples: beyond one GPU per sample, more GPUs do not help.

    python benchmarks/search_cost.py [--tflops 150] [--prefill-json prefill.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math

from dop.flops import count_flops, load_preset_data
from dop.search import make_space
from dop.search.table import layer_evals_per_sample

MODELS = {"llava-1.5-7b": "llava-7b", "qwen2.5-vl-7b": None}  # preset -> benchmarks/prefill.py widths


def per_layer_seconds(preset: str, n_visual: int, n_text: int, tflops: float, prefill: dict | None):
    L = load_preset_data(preset)["decoder"]["num_layers"]
    if prefill is not None and prefill.get("widths") == MODELS[preset] and prefill.get("visual") == n_visual:
        return prefill["median_s"]["vanilla"] / L, f"measured ({prefill.get('machine', '?')})"
    flops = count_flops(preset, None, num_visual_tokens=n_visual, num_text_tokens=n_text).decoder / L
    return flops / (tflops * 1e12), f"estimate at {tflops:g} TFLOP/s"


def rows(args, prefill):
    out = []
    for preset in MODELS:
        d = load_preset_data(preset)
        L, n_visual = d["decoder"]["num_layers"], d["visual_tokens"]["default"]
        t_layer, how = per_layer_seconds(preset, n_visual, args.text, args.tflops, prefill)
        for space in args.spaces:
            evals, naive = layer_evals_per_sample(make_space(space, L, n_visual), args.ranker, value_batch=1)
            for n in args.samples:
                times = {w: math.ceil(n / w) * evals * t_layer for w in args.gpus}
                out.append(dict(model=preset, space=space, visual=n_visual, samples=n, evals_per_sample=evals,
                                naive_per_sample=naive, layer_ms=t_layer * 1e3, how=how, seconds=times))
    return out


def _t(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=150.0,
                    help="sustained bf16 TFLOP/s of one GPU for the estimate (default 150: about half an A100's peak)")
    ap.add_argument("--prefill-json", help="benchmarks/prefill.py --json output to take the layer time from")
    ap.add_argument("--text", type=int, default=64, help="text tokens of a prompt (default 64)")
    ap.add_argument("--samples", default="25,100")
    ap.add_argument("--gpus", default="1,8,64")
    ap.add_argument("--spaces", default="dop,multigroup")
    ap.add_argument("--ranker", default="vispruner")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    args.samples = [int(x) for x in args.samples.split(",")]
    args.gpus = [int(x) for x in args.gpus.split(",")]
    args.spaces = args.spaces.split(",")
    prefill = None
    if args.prefill_json:
        with open(args.prefill_json) as fh:
            prefill = json.load(fh)
    table = rows(args, prefill)
    heads = ["model", "space", "samples", "layer evals / sample (naive)", "ms / layer"] + [
        f"{w} GPU{'s' if w > 1 else ''}" for w in args.gpus]
    lines = []
    for r in table:
        lines.append([r["model"], r["space"], str(r["samples"]), f"{r['evals_per_sample']} ({r['naive_per_sample']})",
                      f"{r['layer_ms']:.2f}"] + [_t(r["seconds"][w]) for w in args.gpus])
    if args.markdown:
        print("| " + " | ".join(heads) + " |")
        print("|" + "|".join("---" for _ in heads) + "|")
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        w = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(heads)]
        print("  ".join(h.ljust(x) for h, x in zip(heads, w)))
        for ln in lines:
            print("  ".join(c.ljust(x) for c, x in zip(ln, w)))
    for how in dict.fromkeys((r["model"], r["how"]) for r in table):
        print(f"layer time of {how[0]}: {how[1]}")
    return table


if __name__ == "__main__":
    main()
