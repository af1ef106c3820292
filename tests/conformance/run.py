"""Conformance run: transformers' own model tests for LLaVA, LLaVA-NeXT, Qwen2.5-VL and
InternVL, run three times -- plain, with a no-op policy and with a pruning policy applied to
every model they build (the pytest plugin ``dop_conformance.py`` beside this file) -- and
compared test by test from their junit XML.

    python tests/conformance/run.py                       # all four families, writes docs/conformance.md
    python tests/conformance/run.py --families llava -k "generate and not beam"
    python tests/conformance/run.py --from-junit DIR      # summarise a previous run again
    python tests/conformance/run.py --check --report /tmp/c.md   # CI: exit 1 on a no-op failure or a crash

The transformers test files (5.24) come from a tarball outside the repository
(``../shared/conformance/transformers-tests.tgz`` by default, or ``--tests`` /
``$DOP_CONFORMANCE_TESTS``); they are extracted to a temporary folder; nothing is fetched.
They need pytest, parameterized, requests, httpx, pytest-xdist and pytest-timeout installed
(test-only packages; not dependencies of dop).

Counted, over the tests that pass unpatched: failing with the no-op policy (must be none);
crashing with the pruning policy (an exception other than a failed assertion of the test, or
a timeout); output differences with the pruning policy (a failed assertion of the test),
each with a short reason (``REASONS`` below).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PLUGIN = "dop_conformance"
FAMILIES = {
    "llava": "tests/models/llava/test_modeling_llava.py",
    "llava_next": "tests/models/llava_next/test_modeling_llava_next.py",
    "qwen2_5_vl": "tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py",
    "internvl": "tests/models/internvl/test_modeling_internvl.py",
}
MODES = ("plain", "noop", "prune")
PASSED, SKIPPED, ASSERTION, CRASH, TIMEOUT = "passed", "skipped", "assertion", "crash", "timeout"
_SEVERITY = {SKIPPED: 0, PASSED: 1, ASSERTION: 2, TIMEOUT: 3, CRASH: 4}

# (pattern, reason) for output differences under the pruning policy: the pattern is searched
# in "test name | failed assertion"; the first match wins
KV_SHORT = ("pruning changes outputs: the KV cache stores only the keys computed (visual keys pruned at a "
            "layer are not stored), so it is shorter than the sequence")
REASONS: list[tuple[str, str]] = [
    (r"(past_key_values|use_cache|assisted).*\| AssertionError: torch\.Size\(\[\d+, \d+, \d+, \d+\]\) != \(", KV_SHORT),
    (r"(compilation_all_outputs|attention).*\| AssertionError: Lists differ: \[torch\.Size",
     "attention weights come back over the stored keys only (the pruned keys' columns are not filled in)"),
    (r"retain_grad", "defect: the attentions / hidden states returned under a policy do not retain gradients"),
    (r"attention_outputs|hidden_states",
     "defect: attentions / hidden states not returned for every layer under a policy"),
    (r"padding_free", "not explained by pruning: a padded batch and the same rows packed padding-free "
     "(position_ids restarting) differ under the policy (cause not investigated)"),
    (r"inputs_embeds", "inputs_embeds run vs input_ids run"),
    (r"tp_plan", "defect: parameter names changed, the tensor-parallel plan no longer matches"),
    (r"save|load|pretrained|state_dict", "save/load round trip"),
    (r"generate|greedy|beam|sample|assisted|prompt_lookup|contrastive|dola|continue_from",
     "generated tokens vs a reference decoding"),
    (r"eager_matches|sdpa|flash|flex|attn_implementation", "attention backends compared"),
    (r"batching_equivalence|padding", "batched vs single rows"),
]


def default_tests_tarball() -> Path:
    env = os.environ.get("DOP_CONFORMANCE_TESTS")
    return Path(env) if env else REPO.parent / "shared" / "conformance" / "transformers-tests.tgz"


# ---------------------------------------------------------------- preparing and running
def prepare(tarball: Path, workdir: Path) -> Path:
    """Extract the test files into ``workdir`` and link ``src/transformers`` to the installed package."""
    import transformers

    if not tarball.is_file():
        raise SystemExit(f"conformance tests: no such file {tarball} (pass --tests PATH)")
    with tarfile.open(tarball) as tar:
        tar.extractall(workdir, filter="data")
    (workdir / "src").mkdir(exist_ok=True)
    link = workdir / "src" / "transformers"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(transformers.__file__).parent)  # test_pipeline_mixin reads it
    return workdir


def run_mode(root: Path, mode: str, families: list[str], keyword: str | None, out: Path,
             timeout: int, ranker: str, python: str = sys.executable) -> tuple[Path, float, int]:
    """One pytest run of the selected family files; returns (junit path, seconds, exit code)."""
    junit = out / f"junit-{mode}.xml"
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", PLUGIN, "-q", "--tb=short",
           f"--timeout={timeout}", f"--junitxml={junit}"]
    if keyword:
        cmd += ["-k", keyword]
    cmd += [FAMILIES[f] for f in families]
    env = dict(os.environ)
    env.pop("DOP_CONFORMANCE_POLICY", None)
    if mode != "plain":
        env["DOP_CONFORMANCE_POLICY"] = mode
        env["DOP_CONFORMANCE_RANKER"] = ranker
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"  # the model tests build from configs; nothing is downloaded
    t0 = time.perf_counter()
    with open(out / f"pytest-{mode}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    return junit, time.perf_counter() - t0, rc


# ---------------------------------------------------------------- reading junit XML
@dataclasses.dataclass
class Result:
    status: str
    exception: str = ""
    message: str = ""
    origin: str = ""
    applied: int = 0


_FRAME = re.compile(r"^(\S+\.py):(\d+):")
_HELPERS = ("/unittest/", "/_pytest/", "torch/testing/", "transformers/testing_utils.py")


def frame_origin(path: str) -> str:
    """Who raised: ``test`` (the test or a comparison helper), ``dop``, ``transformers``, ``torch``, ``other``."""
    p = "/" + path.replace("\\", "/")
    if p.startswith("/tests/") or "/tests/models/" in p or any(h in p for h in _HELPERS):
        return "test"
    if re.search(r"/dop/", p):
        return "dop"
    if "/transformers/" in p:
        return "transformers"
    if "/torch/" in p:
        return "torch"
    return "other"


def classify(tag: str, message: str, text: str) -> Result:
    """A failed or errored testcase: assertion failure of the test, timeout, or crash."""
    message = (message or "").strip()
    first = message.splitlines()[0] if message else ""
    if first.startswith("assert ") or first == "assert":
        exc = "AssertionError"
    else:
        m = re.match(r"^([A-Za-z_][\w.]*)(:|$)", first)
        exc = m.group(1) if m else "?"
    frames = [m.group(1) for m in map(_FRAME.match, (text or "").splitlines()) if m]
    origin = frame_origin(frames[-1]) if frames else "other"
    if exc in ("Failed", "_pytest.outcomes.Failed") and "Timeout" in first:
        return Result(TIMEOUT, "Timeout", first, origin)
    is_assert = exc.split(".")[-1] == "AssertionError" or exc in ("Failed", "_pytest.outcomes.Failed")
    status = ASSERTION if (tag == "failure" and is_assert and origin == "test") else CRASH
    return Result(status, exc, first, origin)


def read_junit(path: Path) -> dict[str, Result]:
    """Test id -> result; a test that appears more than once (subtests) keeps its worst outcome."""
    out: dict[str, Result] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        tid = f"{tc.get('classname')}::{tc.get('name')}"
        res = Result(PASSED)
        for child in tc:
            if child.tag in ("failure", "error"):
                r = classify(child.tag, child.get("message", ""), child.text or "")
                if _SEVERITY[r.status] > _SEVERITY[res.status]:
                    res = r
            elif child.tag == "skipped" and res.status == PASSED:
                res = Result(SKIPPED, message=child.get("message", ""))
        for prop in tc.iter("property"):
            if prop.get("name") == "dop_policies_applied":
                res.applied += int(prop.get("value") or 0)
        prev = out.get(tid)
        if prev is not None:
            res.applied += prev.applied
            if _SEVERITY[prev.status] > _SEVERITY[res.status]:
                prev.applied = res.applied
                res = prev
        out[tid] = res
    return out


def family_of(tid: str) -> str:
    m = re.match(r"tests\.models\.(\w+)\.", tid)
    return m.group(1) if m else "?"


def short_id(tid: str) -> str:
    cls, _, name = tid.partition("::")
    return f"{cls.rsplit('.', 1)[-1]}::{name}"


def reason_for(tid: str, message: str = "") -> str:
    text = f"{tid.partition('::')[2]} | {message}"
    for pattern, reason in REASONS:
        if re.search(pattern, text):
            return reason
    return "unclassified"


# ---------------------------------------------------------------- comparing
def compare(results: dict[str, dict[str, Result]], families: list[str]) -> dict:
    """Counts and lists over the tests that pass unpatched (see the module docstring)."""
    plain = results["plain"]
    base = sorted(t for t, r in plain.items() if r.status == PASSED)
    summary = {"families": {}, "noop_failures": [], "prune_crashes": [], "prune_differences": [],
               "noop_policies_applied": 0, "prune_policies_applied": 0}
    for fam in families:
        summary["families"][fam] = {"plain_passed": 0, "noop_failed": 0, "prune_crashed": 0,
                                    "prune_differs": 0, "prune_passed": 0}
    for tid in base:
        fam = family_of(tid)
        row = summary["families"].setdefault(fam, {"plain_passed": 0, "noop_failed": 0, "prune_crashed": 0,
                                                   "prune_differs": 0, "prune_passed": 0})
        row["plain_passed"] += 1
        for mode in ("noop", "prune"):
            if mode not in results:
                continue
            r = results[mode].get(tid, Result(CRASH, "missing", "not in this mode's junit XML"))
            summary[f"{mode}_policies_applied"] += r.applied
            entry = {"test": tid, "family": fam, "status": r.status, "exception": r.exception,
                     "message": r.message, "origin": r.origin}
            if mode == "noop" and r.status != PASSED:
                row["noop_failed"] += 1
                summary["noop_failures"].append(entry)
            elif mode == "prune":
                if r.status == PASSED:
                    row["prune_passed"] += 1
                elif r.status == ASSERTION:
                    row["prune_differs"] += 1
                    summary["prune_differences"].append(dict(entry, reason=reason_for(tid, r.message)))
                else:
                    row["prune_crashed"] += 1
                    summary["prune_crashes"].append(entry)
    summary["totals"] = {k: sum(r[k] for r in summary["families"].values())
                         for k in ("plain_passed", "noop_failed", "prune_crashed", "prune_differs", "prune_passed")}
    return summary


def git_commit() -> str:
    try:
        head = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], text=True).strip()
        dirty = subprocess.call(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src"]) != 0
        return head + (" (with uncommitted changes under src/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------- output
def _cell(s: str, n: int = 140) -> str:
    s = " ".join(str(s).split())
    s = s if len(s) <= n else s[: n - 1] + "…"
    return s.replace("|", "\\|")


def _cause(e: dict) -> str:
    msg = re.sub(r"\d+", "N", e["message"])
    return f"{e['exception']}: {msg}" if not msg.startswith(e["exception"]) else msg


def format_text(summary: dict, meta: dict) -> str:
    t = summary["totals"]
    lines = [f"conformance run, dop {meta['commit']}, transformers {meta['transformers']}, torch {meta['torch']}",
             f"families: {', '.join(meta['families'])}" + (f"; -k {meta['keyword']!r}" if meta["keyword"] else ""),
             "wall time: " + ", ".join(f"{m} {s:.0f} s" for m, s in meta["seconds"].items())
             + f" (total {sum(meta['seconds'].values()):.0f} s)",
             f"{'family':<12}{'pass plain':>11}{'fail noop':>10}{'crash prune':>12}{'differ prune':>13}{'pass prune':>11}"]
    rows = list(summary["families"].items()) + [("total", t)]
    for fam, r in rows:
        lines.append(f"{fam:<12}{r['plain_passed']:>11}{r['noop_failed']:>10}{r['prune_crashed']:>12}"
                     f"{r['prune_differs']:>13}{r['prune_passed']:>11}")
    lines.append(f"models given a policy: {summary['noop_policies_applied']} (noop), "
                 f"{summary['prune_policies_applied']} (prune), over the tests that pass plain")
    for title, key in (("failing with the no-op policy", "noop_failures"),
                       ("crashing with the pruning policy", "prune_crashes")):
        groups = _group(summary[key])
        if groups:
            lines.append(f"{title}, by cause:")
            lines += [f"  {len(ts):4d}  {_cell(cause, 150)}" for cause, ts in groups]
    if summary["prune_differences"]:
        lines.append("output differences with the pruning policy:")
        lines += [f"  {short_id(e['test'])} [{e['family']}]: {e['reason']}" for e in summary["prune_differences"]]
    return "\n".join(lines)


def _group(entries: list[dict]) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(f"[{e['origin']}] {_cause(e)}", []).append(e)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def format_markdown(summary: dict, meta: dict) -> str:
    t = summary["totals"]
    out = [
        "# Conformance with transformers' model tests",
        "",
        "Generated by `python tests/conformance/run.py` (do not edit by hand; rerun it). It runs",
        "transformers' own model tests for the four families three times: plain, with a no-op",
        "policy (every op at every layer, two rank groups) and with a pruning policy (attention and",
        f"MLP of every visual token skipped from half the depth on, ranker `{meta['ranker']}`) applied",
        "to every model a test builds (`tests/conformance/dop_conformance.py`), and compares the",
        "runs test by test. Over the tests that pass unpatched (junit test cases with no failure,",
        "error or skip; a test whose subtests were skipped is left out), it counts: failing with the",
        "no-op policy (must be none); crashing with the pruning policy (an exception other than a",
        "failed assertion of the test, including errors the test raises itself, or a timeout); output",
        "differences with the pruning policy (a failed assertion of the test, with a reason).",
        "",
        f"- dop commit: `{meta['commit']}`; transformers {meta['transformers']}, torch {meta['torch']}",
        f"- date: {meta['date']}; families: {', '.join(meta['families'])}"
        + (f"; `-k {meta['keyword']}`" if meta["keyword"] else ""),
        "- wall time: " + ", ".join(f"{m} {s:.0f} s" for m, s in meta["seconds"].items())
        + f" (total {sum(meta['seconds'].values()) / 60:.1f} min)",
        f"- models given a policy during the tests that pass plain: {summary['noop_policies_applied']} (no-op),"
        f" {summary['prune_policies_applied']} (pruning)",
        "",
        "| family | pass unpatched | fail with no-op | crash with pruning | output differs with pruning | pass with pruning |",
        "|---|---|---|---|---|---|",
    ]
    for fam, r in list(summary["families"].items()) + [("**total**", t)]:
        out.append(f"| {fam} | {r['plain_passed']} | {r['noop_failed']} | {r['prune_crashed']} | "
                   f"{r['prune_differs']} | {r['prune_passed']} |")
    sections = (
        ("Failing with the no-op policy", "noop_failures"),
        ("Crashing with the pruning policy", "prune_crashes"),
    )
    for title, key in sections:
        entries = summary[key]
        out += ["", f"## {title} ({len(entries)})", ""]
        if not entries:
            out.append("None.")
            continue
        out += ["By cause (`[raised in] exception: message`, numbers replaced by N):", "",
                "| tests | cause |", "|---|---|"]
        out += [f"| {len(ts)} | {_cell(cause, 200)} |" for cause, ts in _group(entries)]
        out += ["", "| test | family | exception | raised in |", "|---|---|---|---|"]
        out += [f"| `{short_id(e['test'])}` | {e['family']} | {_cell(e['message'], 160)} | {e['origin']} |"
                for e in entries]
    diffs = summary["prune_differences"]
    out += ["", f"## Output differences with the pruning policy ({len(diffs)})", ""]
    if diffs:
        out += ["| test | family | failed assertion | reason |", "|---|---|---|---|"]
        out += [f"| `{short_id(e['test'])}` | {e['family']} | {_cell(e['message'], 120)} | {e['reason']} |"
                for e in diffs]
    else:
        out.append("None.")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression selecting tests")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of plain,noop,prune")
    ap.add_argument("--tests", type=Path, default=None, help="the transformers test tarball")
    ap.add_argument("--ranker", default="identity", help="ranker of the policies (identity, spatial, ...)")
    ap.add_argument("--timeout", type=int, default=300, help="per-test timeout (pytest-timeout), seconds")
    ap.add_argument("--out", type=Path, default=None, help="keep junit XML, logs and summary.json here")
    ap.add_argument("--from-junit", type=Path, default=None, help="summarise junit-*.xml of an earlier --out")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if a test that passes unpatched fails with the no-op policy or crashes with the pruning one")
    ap.add_argument("--report", type=Path, default=None,
                    help="markdown report (default docs/conformance.md for a full run, none for a subset)")
    args = ap.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"--families: unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "plain" not in modes or any(m not in MODES for m in modes):
        ap.error("--modes: a comma-separated subset of plain,noop,prune that includes plain")

    import torch
    import transformers

    seconds: dict[str, float] = {}
    commit = git_commit()  # before running: the code the tests ran against
    if args.from_junit:
        out = args.from_junit
        prev = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        meta = prev.get("meta", {})
        seconds = meta.get("seconds", {})
        families = meta.get("families", families)
        keyword = meta.get("keyword", args.keyword)
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="dop-conformance-out-"))
        out.mkdir(parents=True, exist_ok=True)
        keyword = args.keyword
        work = Path(tempfile.mkdtemp(prefix="dop-conformance-"))
        try:
            root = prepare(args.tests or default_tests_tarball(), work)
            for mode in modes:
                junit, secs, rc = run_mode(root, mode, families, keyword, out, args.timeout, args.ranker)
                seconds[mode] = secs
                print(f"{mode}: pytest exit {rc} in {secs:.0f} s ({out / f'pytest-{mode}.log'})", flush=True)
                if not junit.exists():
                    raise SystemExit(f"{mode}: pytest wrote no junit XML; see {out / f'pytest-{mode}.log'}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    results = {m: read_junit(out / f"junit-{m}.xml") for m in MODES if (out / f"junit-{m}.xml").exists()}
    meta = {"commit": commit, "transformers": transformers.__version__, "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "families": families,
            "keyword": keyword, "ranker": args.ranker, "seconds": seconds}
    if args.from_junit and (out / "summary.json").exists():
        old = json.loads((out / "summary.json").read_text())["meta"]
        meta.update({k: old[k] for k in ("commit", "date", "ranker") if k in old})
    summary = compare(results, families)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    print(format_text(summary, meta))
    full = set(families) == set(FAMILIES) and not keyword and set(modes) == set(MODES)
    report = args.report or (REPO / "docs" / "conformance.md" if full else None)
    if report:
        report.write_text(format_markdown(summary, meta))
        print(f"report: {report}")
    print(f"junit XML, logs, summary.json: {out}")
    t = summary["totals"]
    if args.check and (t["noop_failed"] or t["prune_crashed"]):
        print(f"conformance check FAILED: {t['noop_failed']} failing with the no-op policy, "
              f"{t['prune_crashed']} crashing with the pruning policy")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
