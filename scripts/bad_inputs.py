"""Run bad inputs and faults through the `dop` CLI and print a table of their outcomes (issue 16).

    PYTHONPATH=src python scripts/bad_inputs.py [--out table.md]

Every case runs in-process through ``dop.cli.main`` on a tiny random checkpoint (built here,
no download) or the bundled demo; it passes when the outcome is the expected one: a clear
one-line error (exit 2 for a bad input, 1 for a lock or a late system failure) or a correct
result (exit 0, with the check named in the table). Exit status: the number of cases that
did not behave (0 = all good).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-checkpoint builder of the test suite

RO = "/proc"  # a folder nobody can create files in, root included


def _png_header(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _jsonl(folder: Path, rows: list[dict], image: str = "ok.png") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 20, 20)).save(folder / "ok.png")
    with open(folder / "data.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"image": image, **r}) + "\n")
    return str(folder / "data.jsonl")


def setup(tmp: Path) -> dict:
    from fixtures_eval import build_tiny_llava

    from dop.policy import Policy

    f = {"tmp": str(tmp)}
    f["model"] = str(build_tiny_llava(tmp / "tiny"))
    f["data"] = _jsonl(tmp / "data", [{"question": "what color is the circle ?", "answers": ["red"]}] * 3)
    broken = tmp / "broken"
    shutil.copytree(f["model"], broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    f["broken"] = str(broken)
    f["blank"] = _jsonl(tmp / "blank", [{"question": "q ?", "answers": [""]}])
    f["strans"] = _jsonl(tmp / "strans", [{"question": "q ?", "answers": "yes"}])
    f["notimg"] = _jsonl(tmp / "notimg", [{"question": "q ?", "answers": ["red"]}], image="data.jsonl")
    (tmp / "latin1").mkdir()
    (tmp / "latin1" / "data.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    f["latin1"] = str(tmp / "latin1" / "data.jsonl")
    (tmp / "deep").mkdir()
    (tmp / "deep" / "data.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    f["deepjsonl"] = str(tmp / "deep" / "data.jsonl")
    (tmp / "big").mkdir()
    _png_header(tmp / "big" / "big.png", 15000, 15000)
    (tmp / "big" / "data.jsonl").write_text(json.dumps({"image": "big.png", "question": "q ?", "answers": ["a1"]}) + "\n")
    f["bigimg"] = str(tmp / "big")
    f["nested"] = str(tmp / "nested.json")
    Path(f["nested"]).write_text('{"format": "dop-policy/1", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}")
    f["huge"] = str(tmp / "huge.json")
    with open(f["huge"], "wb") as fh:
        fh.write(b"{")
        fh.truncate(600 * 2**20)  # sparse
    f["binary"] = str(tmp / "binary.json")
    Path(f["binary"]).write_bytes(bytes(range(256)))
    f["p4"] = str(tmp / "p4.json")
    Policy(4, [0.5, 1.0], {"attn": [4, 1]}).to_json(f["p4"])
    f["p8"] = str(tmp / "p8.json")
    Policy(8, [0.25, 0.5, 0.75, 1.0], {"attn": [7, 5, 3, 1]}).to_json(f["p8"])
    good_table = {"format": "dop-search-table/1", "key": {"measured": {"n_v": [0, 4]}}, "num_samples": 2,
                  "entries": {"n_v": {"0": [0.5, 0.2], "4": [0.0, 0.0]}}}
    for name, entry in (("tstr", "oops"), ("tshort", [0.1])):
        t = json.loads(json.dumps(good_table))
        t["entries"]["n_v"]["4"] = entry
        f[name] = str(tmp / f"{name}.json")
        Path(f[name]).write_text(json.dumps(t))
    f["tdeep"] = str(tmp / "tdeep.json")
    Path(f["tdeep"]).write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    f["afile"] = str(tmp / "p4.json")
    f["ok"] = str(tmp / "out.json")
    return f


S = ["search", "--model", "{model}", "--data", "{data}", "--samples", "2", "--no-progress", "--ranker", "random"]
E = ["eval", "--model", "{model}", "--no-progress"]
B = ["baseline", "vispruner", "--model", "demo"]

# (what, argv, expected exit code, text the outcome must contain)
CASES = [
    ("search -o in a read-only folder", S + ["--budget", "0.9", "-o", f"{RO}/p.json"], 2, "cannot create files"),
    ("search --json in a read-only folder", S + ["--budget", "0.9", "-o", "{ok}", "--json", f"{RO}/s.json"], 2, "cannot create files"),
    ("search --table in a read-only folder", S + ["--budget", "0.9", "-o", "{ok}", "--table", f"{RO}/t.json"], 2, "cannot create files"),
    ("search -o an existing folder", S + ["--budget", "0.9", "-o", "{tmp}"], 2, "is a folder"),
    ("search --budget tokens:0", S + ["--budget", "tokens:0", "-o", "{ok}"], 2, "keeps no visual token"),
    ("search --budget tokens:0/9", S + ["--budget", "tokens:0/9", "-o", "{ok}"], 2, "0 < a <= b"),
    ("search --budget 99T (above the unpruned cost)", S + ["--budget", "99T", "-o", "{ok}"], 0, "nothing is pruned"),
    ("search --budget 1.0 (the unpruned cost)", S + ["--budget", "1.0", "-o", "{ok}"], 0, "nothing is pruned"),
    ("search --budget 2", S + ["--budget", "2", "-o", "{ok}"], 2, "must lie in (0, 1]"),
    ("search --budget abc", S + ["--budget", "abc", "-o", "{ok}"], 2, "not understood"),
    ("search --budget 0.01 (below the cheapest policy)", S + ["--budget", "0.01", "-o", "{ok}"], 2, "infeasible"),
    ("search --samples 0", S + ["--samples", "0", "--budget", "0.9", "-o", "{ok}"], 2, "positive integer"),
    ("search --threads 0", S + ["--threads", "0", "--budget", "0.9", "-o", "{ok}"], 2, "positive integer"),
    ("search --ranker nosuch", S + ["--ranker", "nosuch", "--budget", "0.9", "-o", "{ok}"], 2, "unknown ranker"),
    ("search --data nosuch:val", S + ["--data", "nosuch:val", "--budget", "0.9", "-o", "{ok}"], 2, "unknown data set"),
    ("search --data missing file", S + ["--data", "{tmp}/none.jsonl", "--budget", "0.9", "-o", "{ok}"], 2, "not found"),
    ("search --table with a string entry", S + ["--budget", "0.9", "-o", "{ok}", "--table", "{tstr}"], 2, "must be a list of 2"),
    ("search --table with a short entry", S + ["--budget", "0.9", "-o", "{ok}", "--table", "{tshort}"], 2, "must be a list of 2"),
    ("search --table nested 100k deep", S + ["--budget", "0.9", "-o", "{ok}", "--table", "{tdeep}"], 2, "nested too deeply"),
    ("search --model with truncated safetensors", S + ["--model", "{broken}", "--budget", "0.9", "-o", "{ok}"], 2, "damaged or incomplete"),
    ("search --model missing folder", S + ["--model", "./nope/model", "--budget", "0.9", "-o", "{ok}"], 2, "not found"),
    ("search --model a file", S + ["--model", "{afile}", "--budget", "0.9", "-o", "{ok}"], 2, "is a file"),
    ("eval --json in a read-only folder", E + ["--data", "{data}", "--json", f"{RO}/e.json"], 2, "cannot create files"),
    ('eval --data with answers [""]', E + ["--data", "{blank}"], 2, "blank answer"),
    ('eval --data with answers "yes" (a string)', E + ["--data", "{strans}"], 2, "non-empty list of strings"),
    ("eval --data not UTF-8", E + ["--data", "{latin1}"], 2, "not UTF-8"),
    ("eval --data a line nested 100k deep", E + ["--data", "{deepjsonl}"], 2, "nested too deeply"),
    ("eval --data a 15000x15000 PNG (27 KB)", E + ["--data", "{bigimg}"], 2, "--max-image-pixels"),
    ("eval --data image that is not an image", E + ["--data", "{notimg}"], 2, "cannot read image"),
    ("eval --policy nested 200 KB", E + ["--data", "{data}", "--policy", "{nested}"], 2, "nested 100001 levels"),
    ("eval --policy a 600 MB file", E + ["--data", "{data}", "--policy", "{huge}"], 2, "larger than"),
    ("eval --policy binary bytes", E + ["--data", "{data}", "--policy", "{binary}"], 2, "not UTF-8"),
    ("eval --policy for 4 layers on a 2-layer model", E + ["--data", "{data}", "--policy", "{p4}"], 2, "4 decoder layers"),
    ("eval --max-new-tokens 0", E + ["--data", "{data}", "--max-new-tokens", "0"], 2, "at least 1"),
    ("eval --limit 0", E + ["--data", "{data}", "--limit", "0"], 2, "positive integer"),
    ("eval --max-image-pixels 0", E + ["--data", "{data}", "--max-image-pixels", "0"], 2, "positive integer"),
    ("eval --ranker without --policy", E + ["--data", "{data}", "--ranker", "random"], 2, "only together with --policy"),
    ("baseline -o in a read-only folder", B + ["--tokens", "8", "-o", f"{RO}/b.json"], 2, "cannot create files"),
    ("baseline --budget-tokens 0", B + ["--budget-tokens", "0", "-o", "{ok}"], 2, "keeps no visual token"),
    ("baseline --budget tokens:0", B + ["--budget", "tokens:0", "-o", "{ok}"], 2, "keeps no visual token"),
    ("baseline --budget 1.5", B + ["--budget", "1.5", "-o", "{ok}"], 2, "must lie in (0, 1]"),
    ("baseline --budget 0.25 (below the text tokens' cost, dop)", B + ["--budget", "0.25", "-o", "{ok}"], 2, "below what this method costs"),
    ("baseline --budget 0.5 (dop convention, as search)", B + ["--budget", "0.5", "-o", "{ok}"], 0, "(dop convention)"),
    ("baseline pdrop --tokens 64", ["baseline", "pdrop", "--model", "demo", "--tokens", "64", "-o", "{ok}"], 2, "ratio per stage"),
    ("baseline --model nope", ["baseline", "spatial", "--model", "nope", "--tokens", "4", "-o", "{ok}"], 2, "unknown model"),
    ("baseline while another process writes -o", B + ["--tokens", "8", "-o", "{ok}"], 1, "another dop process"),
    ("transfer -o in a read-only folder", ["transfer", "{p8}", "--num-layers", "4", "-o", f"{RO}/t.json"], 2, "cannot create files"),
    ("transfer [7,5,3,1] 8 -> 4 layers", ["transfer", "{p8}", "--num-layers", "4", "-o", "{tmp}/t4.json"], 0,
     "[4, 3, 2, 1]"),
    ("transfer [7,5,3,1] 8 -> 2 layers (collapse)", ["transfer", "{p8}", "--num-layers", "2"], 0, "collapse"),
    ("transfer --num-layers 0", ["transfer", "{p8}", "--num-layers", "0"], 2, "positive integer"),
    ("transfer a nested policy", ["transfer", "{nested}", "--num-layers", "4"], 2, "nested"),
    ("flops --model demo", ["flops", "--model", "demo"], 0, "decoder TFLOPs"),
    ("flops --model nope", ["flops", "--model", "nope"], 2, "unknown model"),
    ("flops --policy for 4 layers on demo (8)", ["flops", "--model", "demo", "--policy", "{p4}"], 2, "--transfer"),
    ("data export --out in a read-only folder", ["data", "export", "shapes", "--n", "2", "--out", f"{RO}/x"], 2, "cannot create files"),
    ("data export --out a non-empty folder", ["data", "export", "shapes", "--n", "2", "--out", "{tmp}/full"], 2, "not empty"),
    ("data export --n 0", ["data", "export", "shapes", "--n", "0", "--out", "{tmp}/new"], 2, "positive"),
    ("data export nosuch", ["data", "export", "nosuch", "--out", "{tmp}/new"], 2, "unknown data set"),
    ("run --out in a read-only folder", ["run", "--out", f"{RO}/r"], 2, "cannot create files"),
    ("run --out an existing file", ["run", "--out", "{afile}"], 2, "is a file"),
    ("run --baselines foo", ["run", "--out", "{tmp}/r", "--baselines", "foo"], 2, "unknown method"),
    ("run --space nope", ["run", "--out", "{tmp}/r", "--space", "nope"], 2, "unknown search space"),
    ("run --max-new-tokens 0", ["run", "--out", "{tmp}/r", "--max-new-tokens", "0"], 2, "positive integer"),
    ("run --budgets tokens:0", ["run", "--out", "{tmp}/r", "--budgets", "tokens:0"], 2, "keeps no visual token"),
    ("run --samples 0", ["run", "--out", "{tmp}/r", "--samples", "0"], 2, "positive integer"),
    ("run --ranker nosuch", ["run", "--out", "{tmp}/r", "--ranker", "nosuch"], 2, "unknown ranker"),
]


def run_case(what: str, argv: list[str], fixtures: dict) -> tuple[int, str, str]:
    from dop.cli import main
    from dop.outputs import output_lock

    argv = [a.format(**fixtures) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    # the concurrent-writer case: this process holds the output's lock, as a first writer would
    locked = output_lock([fixtures["ok"]]) if "another process" in what else contextlib.nullcontext()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with locked:
                rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except Exception as e:  # what the CLI let through: the case fails, the script goes on
            rc = -1
            print(f"Traceback (escaped the CLI): {type(e).__name__}: {e}", file=sys.stderr)
    return rc, out.getvalue(), err.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    rows, bad = ["| # | input or fault | exit | outcome |", "|---|---|---|---|"], 0
    with tempfile.TemporaryDirectory() as d:
        fixtures = setup(Path(d))
        for i, (what, argv, code, needle) in enumerate(CASES, 1):
            rc, out, err = run_case(what, argv, fixtures)
            lines = [line for line in err.splitlines() if line.startswith("dop: error:")]
            text = " ".join((lines[0] if lines else (err + out)).split())
            if rc == 0:
                text = " ".join((err + out).split())
            ok = rc == code and needle in (err + out) and "Traceback" not in err and (rc == 0 or len(lines) == 1)
            bad += not ok
            shown = text.replace(d, "TMP").replace("|", "\\|")
            if len(shown) > 170:
                shown = shown[:167] + "..."
            rows.append(f"| {i} | {what} | {rc} | {'' if ok else 'UNEXPECTED: '}{shown} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(f"\n{len(CASES) - bad} of {len(CASES)} cases behaved (a clear one-line error or a correct result)")
    return bad


if __name__ == "__main__":
    sys.exit(main())
