"""`dop serve` over HTTP against `dop eval` (docs/serving.md, "Exactness").

Starts ``dop serve --model demo --policy P`` (float32) on a local port, sends the first N
``shapes:test`` questions as OpenAI chat requests (images as PNG data URLs), C at a time,
and compares the greedy answers with ``dop eval --policy P`` predictions. Exits 1 on any
difference.

    python scripts/serve_http_check.py --policy policy.json --limit 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the very pixels dop eval reads
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_healthy(port: int, proc, timeout: float = 600) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"dop serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise SystemExit("dop serve: not ready in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--log", default="dop-serve.log", help="the server's output (default dop-serve.log)")
    ap.add_argument("--url", help="a running `dop serve` of the demo with this policy (served as 'demo'): start none")
    ap.add_argument("--served-name", default="demo", help="the model name the server answers to (default demo)")
    ap.add_argument("--expected", help="a `dop eval --policy --json` output of the same samples: run no dop eval")
    args = ap.parse_args()

    from openai import OpenAI

    from dop.demo.shapes import make_samples

    with tempfile.TemporaryDirectory() as tmp:
        dest = args.expected or os.path.join(tmp, "eval.json")
        args.expected or subprocess.run([sys.executable, "-m", "dop.cli", "eval", "--model", "demo", "--data", "shapes:test",
                        "--limit", str(args.limit), "--policy", args.policy, "--no-baseline", "--no-progress",
                        "--json", dest], check=True, stdout=subprocess.DEVNULL)
        expected = [s["prediction"] for s in json.load(open(dest))["samples"]]

    expected = expected[:args.limit]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    server = None if args.url else subprocess.Popen([sys.executable, "-m", "dop.cli", "serve", "--model", "demo", "--policy", args.policy,
                               "--port", str(args.port), "--", "--dtype", "float32", "--max-model-len", "512",
                               "--gpu-memory-utilization", "0.1", "--served-model-name", "demo"],
                              env=env, stdout=open(args.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = args.url or f"http://127.0.0.1:{args.port}"
        if server is not None:
            wait_healthy(args.port, server)
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        samples = make_samples("test", args.limit)

        def ask(s):
            r = client.chat.completions.create(
                model=args.served_name, temperature=0, max_tokens=10,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(s["image"])}},
                    {"type": "text", "text": s["question"]}]}])
            return r.choices[0].message.content.strip()

        t0 = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            got = list(pool.map(ask, samples))
        wall = time.time() - t0
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    differ = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    print(f"{os.path.basename(args.policy)}: {len(got) - len(differ)}/{len(got)} answers over HTTP equal to dop eval "
          f"({args.concurrency} concurrent, {wall:.0f} s)" + (f"; differing {differ[:10]}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
