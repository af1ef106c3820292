"""Does batching pay for the divergence table? Per-sample time of the demo model's decoder
at batch sizes 1, 2, 4, 8 (demo-length prompts, float32, on this machine's CPU).

The divergence table runs one policy per forward. Putting several candidate values of a
parameter into one batch would need a policy per batch row; this measures the most it could
save: the per-sample time of a plain decoder forward as the batch grows.

    python benchmarks/batching.py [--threads 1] [--repeats 15] [--tokens 170]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlavaForConditionalGeneration

from dop.demo import DEMO_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=170, help="prompt length (demo: 144 visual + text)")
    ap.add_argument("--batches", default="1,2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = LlavaForConditionalGeneration.from_pretrained(DEMO_DIR).eval().model.language_model
    base = None
    print(f"demo decoder, {args.tokens} tokens, {args.threads} thread(s), median of {args.repeats}")
    for b in (int(x) for x in args.batches.split(",")):
        h = torch.randn(b, args.tokens, lm.config.hidden_size)
        times = []
        with torch.no_grad():
            for i in range(args.repeats + 3):
                t = time.perf_counter()
                lm(inputs_embeds=h)
                if i >= 3:  # warm-up
                    times.append(time.perf_counter() - t)
        per = statistics.median(times) / b
        base = base or per
        print(f"batch {b}: {1e3 * per:7.2f} ms per sample, {base / per:4.2f}x faster per sample than batch 1")


if __name__ == "__main__":
    main()
