"""GPU check (issue 12 item 5): one command for a machine with one CUDA GPU and torch +
transformers installed; nothing is downloaded. Under 8 minutes on one GPU.

    python benchmarks/gpu_check.py [--json gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --smoke      # the same code, tiny widths, on CPU

1. Exactness: the tiny families (tests/tiny_models.py), three fixed policies each, pruned
   prefill logits against the masked reference (tests/reference.py) computed in float64 on
   the same device. The tolerance of a dtype is derived from the unpruned model's own error in
   that dtype against float64 on the same inputs: 4x that error plus a floor of 1 ulp of the
   largest logit; each policy must move the logits by more than twice that tolerance. With
   flash_attention_2 importable, bf16 is checked again with the models loaded for it. Greedy tokens must equal the reference's in float32 (printed for bf16).
2. Prefill latency at LLaVA-1.5-7B decoder widths (32 layers, random weights, bf16), 576
   visual + 64 text tokens, batch 1 and 8, SDPA and flash_attention_2 when importable, timed
   with CUDA events: vanilla; the full policy (the wrapper's overhead); DOP policies at about
   25% and 14% of decoder FLOPs; the vanilla model on a sequence shortened to the same FLOPs.
   One table of ratios: time cut vs FLOPs cut, op-pruned vs shortened speedup.
3. vLLM (when vLLM is importable; --skip-vllm leaves it out): dop's serving plugin against dop
   eval on 20 demo prompts (scripts/serving_exactness.py) and the serving benchmark
   (benchmarks/serve.py: batch TTFT and prefill throughput, unpruned vs pruned, at 1/8/32
   concurrent requests, demo and a 7B-width LLaVA with dummy weights); their lines are
   printed and kept under "vllm" in --json (docs/serving.md).

Exit status 1 when an equality check fails or a case raises (the error is printed and the
rest still runs).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers as T

import dop
from dop.flops import count_flops
from dop.models import get_adapter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load(name: str, path: Path):
    """Import a module of the repository by path (the tests folder is not a package)."""
    mod = sys.modules.get(name)
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == path.resolve():
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


reference = _load("reference", REPO / "tests" / "reference.py")
tiny_models = _load("tiny_models", REPO / "tests" / "tiny_models.py")
prefill = _load("prefill", HERE / "prefill.py")

# policies for the 4-layer tiny models: every op kind, one to three groups
TINY_POLICIES = [
    {"groups": [0.5, 1.0], "depth": {"attn": [4, 1], "mlp": [4, 0]}},
    {"groups": [0.25, 0.5, 1.0], "depth": {"attn_q": [4, 2, 1], "attn_kv": [3, 2, 0], "mlp": [4, 1, 2]}},
    {"groups": [1.0], "depth": {"attn": [2], "mlp": [2]}},
]
UNPRUNED_ERROR_FACTOR = 4.0
FLOOR_ULPS = 1.0
MOVED_FACTOR = 2.0  # a policy must move the logits this many tolerances, else the check is empty


# ---------------------------------------------------------------- 1. exactness
def _to(inputs: dict, device, dtype) -> dict:
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}


def tolerance(unpruned_error: float, scale: float, dtype) -> float:
    """Allowed |pruned - float64 reference|: a multiple of the unpruned model's own error, plus a floor."""
    return UNPRUNED_ERROR_FACTOR * unpruned_error + FLOOR_ULPS * torch.finfo(dtype).eps * max(1.0, scale)


@torch.no_grad()
def check_family(family: str, device: str, dtypes: list, new_tokens: int, backends=("sdpa",)) -> list[dict]:
    """Pruned logits (and greedy tokens) of ``family`` against the float64 masked reference,
    per attention backend and dtype (flash kernels: half precision only)."""
    base = tiny_models.build_model(family, attn="sdpa")
    inputs, counts = tiny_models.build_inputs(base, family, num_images=2)
    m64 = copy.deepcopy(base).double().to(device)
    in64 = _to(inputs, device, torch.float64)
    adapter64 = get_adapter(m64)
    L = adapter64.num_layers
    vanilla64 = m64(**in64).logits
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(n, generator=gen).tolist() for n in counts]
    refs = []
    for pd in TINY_POLICIES:
        pd = dict(pd, format="dop-policy/1", num_layers=L)
        # the reference makes its masks with the default device; only it runs under this context
        with torch.device(device), reference.masked_reference(
                m64, adapter64.decoder_layers(), adapter64.entry_module(), adapter64.image_token_id, pd, counts, perms):
            refs.append((pd, m64(**in64, use_cache=False).logits))
    rows = []
    for backend, dtype in [(b, d) for b in backends for d in dtypes]:
        if backend.startswith("flash") and dtype not in (torch.float16, torch.bfloat16):
            continue
        where = {"family": family, "backend": backend, "dtype": str(dtype).replace("torch.", "")}
        try:
            model = tiny_models.build_model(family, attn=backend)
            model.load_state_dict(base.state_dict())
            # the backend under test is the decoder's; the vision tower keeps the base model's
            model.config.vision_config._attn_implementation = base.config.vision_config._attn_implementation
            model = model.to(dtype).to(device)
            ins = _to(inputs, device, dtype)
            adapter = get_adapter(model)
            unpruned_err = (model(**ins).logits.double() - vanilla64).abs().max().item()
        except Exception as e:  # noqa: BLE001
            rows += [dict(where, policy=i, ok=False, error=f"unpruned model: {type(e).__name__}: {e}",
                          traceback=traceback.format_exc()) for i in range(len(refs))]
            continue
        for i, (pd, ref) in enumerate(refs):
            row = dict(where, policy=i, unpruned_error=unpruned_err, moved=(ref - vanilla64).abs().max().item())
            try:
                if dtype == torch.float32:  # greedy tokens of the reference in the same dtype
                    with torch.device(device), reference.masked_reference(
                            model, adapter.decoder_layers(), adapter.entry_module(), adapter.image_token_id,
                            pd, counts, perms):
                        ref_tokens = reference.reference_greedy(model, ins, new_tokens)
                else:
                    ref_tokens = None
                with dop.apply_policy(model, dop.Policy.from_dict(pd), ranker=lambda ctx: perms):
                    out = model(**ins).logits
                    tokens = model.generate(**ins, max_new_tokens=new_tokens, do_sample=False)[0, -new_tokens:].tolist()
                err = (out.double() - ref).abs().max().item()
                tol = tolerance(unpruned_err, ref.abs().max().item(), dtype)
                row.update(pruned_error=err, tolerance=tol, tokens_equal=None if ref_tokens is None else tokens == ref_tokens)
                row["ok"] = err <= tol and row["tokens_equal"] is not False and row["moved"] > MOVED_FACTOR * tol
            except Exception as e:  # noqa: BLE001  (report and go on: one run shows every failure)
                row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            rows.append(row)
        del model
    return rows


def print_exactness(rows: list[dict]) -> None:
    print("exactness: pruned prefill logits vs the float64 masked reference (max |diff|), tolerance = "
          f"{UNPRUNED_ERROR_FACTOR:g} x unpruned error + {FLOOR_ULPS:g} ulp")
    print(f"{'family':<12}{'backend':<19}{'dtype':<10}{'policy':>6}{'pruned err':>12}{'unpruned err':>14}{'tolerance':>11}"
          f"{'policy moves':>14}{'tokens':>8}  result")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<12}{r['backend']:<19}{r['dtype']:<10}{r['policy']:>6}  FAILED: {r['error'].splitlines()[0][:160]}")
            continue
        tok = {True: "equal", False: "DIFFER", None: "-"}[r["tokens_equal"]]
        print(f"{r['family']:<12}{r['backend']:<19}{r['dtype']:<10}{r['policy']:>6}{r['pruned_error']:>12.3g}{r['unpruned_error']:>14.3g}"
              f"{r['tolerance']:>11.3g}{r['moved']:>14.3g}{tok:>8}  {'ok' if r['ok'] else 'FAILED'}")


# ---------------------------------------------------------------- 2. prefill latency
def latency(widths: str, n_visual: int, n_text: int, dtype, device: str, backends: list[str],
            batches: list[int], targets: list[float], repeats: int) -> list[dict]:
    """Per backend and batch size: medians of vanilla, full policy, DOP policies and shortened sequences."""
    clock = prefill.timer(device)
    rows = []
    for attn in backends:
        torch.manual_seed(0)
        try:
            model, cfg, side = prefill.build(widths, n_visual, dtype, device, attn)
        except Exception as e:  # noqa: BLE001
            rows.append({"backend": attn, "error": f"building the model: {type(e).__name__}: {e}"})
            continue
        L = cfg.text_config.num_hidden_layers
        table = prefill.policy_table(model, n_visual, n_text)
        plans = []
        for t in targets:
            pol = prefill.find_policy(model, n_visual, n_text, t, table=table)
            pf = count_flops(model, pol, num_visual_tokens=n_visual, num_text_tokens=n_text)
            n_short = prefill.shortened_tokens(model, n_visual, n_text, pf.decoder)
            short = count_flops(model, None, num_visual_tokens=n_short, num_text_tokens=n_text)
            plans.append({"target": t, "policy": pol, "flops": pf.decoder_fraction, "short_tokens": n_short,
                          "short_flops": short.decoder / pf.decoder_unpruned})
        full = dop.Policy(L, [0.25, 1.0], {"attn_q": [L, L], "attn_kv": [L, L], "mlp": [L, L]})

        def timed(inputs, policy=None):
            def run():
                # the policy is applied outside the timed region: only the forward is timed
                handle = dop.apply_policy(model, policy, ranker="spatial") if policy is not None else None
                try:
                    return clock(lambda: model(**inputs, use_cache=False))
                finally:
                    if handle is not None:
                        handle.remove()
            return run

        for b in batches:
            row = {"backend": attn, "batch": b, "widths": widths, "layers": L}
            try:
                inputs = prefill.make_inputs(n_visual, n_text, side, device, dtype, b)
                cases = {"vanilla": timed(inputs), "full": timed(inputs, full)}
                for p in plans:
                    cases[f"dop@{p['target']:g}"] = timed(inputs, p["policy"])
                    cases[f"short@{p['target']:g}"] = timed(prefill.short_inputs(p["short_tokens"], n_text, device, b))
                times = prefill.measure(cases, lambda fn: fn(), repeats)
                med = {k: statistics.median(v) for k, v in times.items()}
                row.update(median_s=med, runs_s=times, overhead_full=med["full"] / med["vanilla"] - 1.0, targets=[])
                for p in plans:
                    t_dop, t_short = med[f"dop@{p['target']:g}"], med[f"short@{p['target']:g}"]
                    tf = t_dop / med["vanilla"]
                    row["targets"].append({
                        "target": p["target"], "policy": p["policy"].to_dict(), "flops_fraction": p["flops"],
                        "time_fraction": tf, "short_tokens": p["short_tokens"], "short_flops_fraction": p["short_flops"],
                        "short_time_fraction": t_short / med["vanilla"],
                        "time_cut_per_flops_cut": (1.0 - tf) / (1.0 - p["flops"]),
                        "pruned_vs_shortened": t_short / t_dop,
                    })
            except Exception as e:  # noqa: BLE001
                row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            rows.append(row)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_latency(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'backend':<20}{'batch':>5}{'vanilla ms':>11}{'full':>8}{'target':>8}{'FLOPs':>7}{'time':>7}"
          f"{'short FLOPs':>12}{'short time':>11}{'cut/FLOPs cut':>14}{'pruned/short':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<20}{r.get('batch', '-'):>5}  FAILED: {r['error'].splitlines()[0][:160]}")
            continue
        for i, t in enumerate(r["targets"]):
            lead = (f"{r['backend']:<20}{r['batch']:>5}{r['median_s']['vanilla'] * 1e3:>11.2f}"
                    f"{r['overhead_full'] * 100:>+7.1f}%") if i == 0 else " " * 44
            print(f"{lead}{t['target'] * 100:>7.0f}%{t['flops_fraction']:>7.3f}{t['time_fraction']:>7.3f}"
                  f"{t['short_flops_fraction']:>12.3f}{t['short_time_fraction']:>11.3f}"
                  f"{t['time_cut_per_flops_cut']:>14.3f}{t['pruned_vs_shortened']:>13.3f}")
    print("full: time of the every-op policy over vanilla - 1; FLOPs / time: decoder FLOPs and median prefill time of\n"
          "the DOP policy as fractions of vanilla (short: the vanilla model on a sequence shortened to the same FLOPs);\n"
          "cut/FLOPs cut: (1 - time) / (1 - FLOPs); pruned/short: speedup of the DOP policy over that of the\n"
          "shortened sequence (1.0: pruning operations is as fast as feeding fewer tokens).")


def flash_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def vllm_rows(smoke: bool) -> list[dict]:
    """Section 3: the serving plugin's exactness script and the serving benchmark, each as a
    subprocess (vLLM owns its process); their output lines, and whether they exited 0."""
    import subprocess

    runs = [("vllm exactness", [sys.executable, str(REPO / "scripts" / "serving_exactness.py"), "--limit", "20",
                                "--out", str(Path(__import__("tempfile").mkdtemp()))]),
            ("vllm serve benchmark", [sys.executable, str(HERE / "serve.py"), "--repeat", "1" if smoke else "3"]
             + (["--models", "demo", "--concurrency", "1,8"] if smoke else []))]
    rows = []
    for name, cmd in runs:
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.strip()]
        print(f"\n{name}:" + "".join(f"\n  {l}" for l in lines))
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
        rows.append({"check": name, "ok": p.returncode == 0, "lines": lines})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths, a few tokens: checks the code, not the speed")
    ap.add_argument("--dtypes", default=None, help="exactness dtypes (default float32,bfloat16; smoke: float32)")
    ap.add_argument("--families", default=",".join(tiny_models.FAMILIES), help="tiny families of the exactness part")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the latency part")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 10; smoke 2)")
    ap.add_argument("--backends", default=None,
                    help="attention implementations (default sdpa, plus flash_attention_2 when importable)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true", help="leave out the vLLM rows (docs/serving.md)")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu --smoke to check the code on CPU)")
    if args.device == "cuda":
        # exactness in float32 means float32: no TF32 matrix products
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32" if args.smoke else "float32,bfloat16")).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    backends = (args.backends.split(",") if args.backends
                else ["sdpa"] + (["flash_attention_2"] if args.device == "cuda" and flash_available() else []))
    repeats = args.repeats or (2 if args.smoke else 10)
    widths, n_visual, n_text = ("tiny", 36, 4) if args.smoke else ("llava-7b", 576, 64)
    lat_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"gpu_check: {args.device} ({device_name}), torch {torch.__version__}, transformers {T.__version__}, "
          f"dop {dop.__version__}{', smoke' if args.smoke else ''}")
    res = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
           "transformers": T.__version__, "smoke": args.smoke, "exactness": [], "latency": []}
    if not args.skip_exactness:
        for fam in args.families.split(","):
            res["exactness"] += check_family(fam, args.device, dtypes, 3, backends)
        print_exactness(res["exactness"])
    if not args.skip_latency:
        res["latency"] = latency(widths, n_visual, n_text, lat_dtype, args.device, backends, batches,
                                 [0.25, 0.14], repeats)
        clock = "CUDA events" if args.device == "cuda" else "perf_counter"
        print_latency(res["latency"], f"prefill latency: {widths} decoder widths, {n_visual} visual + {n_text} text "
                                      f"tokens, {str(lat_dtype).replace('torch.', '')}, median of {repeats} ({clock})")
    if not args.skip_vllm and importlib.util.find_spec("vllm") is not None:
        res["vllm"] = vllm_rows(args.smoke)
    failures = [r for r in res["exactness"] if not r["ok"]] + [r for r in res["latency"] if "error" in r]
    failures += [r for r in res.get("vllm", []) if not r["ok"]]
    res["seconds"] = time.perf_counter() - t0
    res["ok"] = not failures
    print(f"gpu_check: {'all checks passed' if not failures else f'{len(failures)} FAILED'} in {res['seconds']:.0f} s")
    for r in failures:
        if "traceback" in r:
            print(r["traceback"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
