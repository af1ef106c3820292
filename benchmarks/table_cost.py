"""The divergence table's cost and its equality with the naive table, on the demo model.

Builds the ``dop`` space's table (as ``dop search`` does) twice, batched replay (the default,
``value_batch`` entries of one start layer per forward) and naive (every entry a full forward
of its own), and prints: decoder-layer calls and token rows through the MLP of each, against
the naive counts, and the largest difference between the two tables' entries next to the
float32 noise of a first-token KL on this model: the KL between a sample's unpruned logits
of the naive table computed with two samples per padded forward (``--batch-size 2``, the
same arithmetic in another batch shape, accepted as equal since issue 12).

    python benchmarks/table_cost.py [--samples 25] [--space dop] [--value-batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model
from dop.models import get_adapter
from dop.rankers import resolve_ranker
from dop.search import make_space
from dop.search.divergence import prepare_samples, reference_shape
from dop.search.table import VALUE_BATCH, build_table


def largest_difference(a, b) -> tuple[float, float]:
    """Largest absolute difference of two tables' entries, and the largest relative one among
    entries above 1e-4 (smaller ones are float32 noise on their own)."""
    pairs = [(x, y) for n in a.entries for v in a.entries[n] for x, y in zip(a.entries[n][v], b.entries[n][v])]
    return max(abs(x - y) for x, y in pairs), max(abs(x - y) / y for x, y in pairs if y > 1e-4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--space", default="dop")
    ap.add_argument("--ranker", default="vispruner")
    ap.add_argument("--value-batch", type=int, default=VALUE_BATCH)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = load_model("demo")
    prepared = prepare_samples(model, processor, load_dataset("shapes:val", limit=args.samples))
    counts, _ = reference_shape(prepared)
    L = get_adapter(model).num_layers
    sp = make_space(args.space, L, max(counts))
    rk = resolve_ranker(args.ranker)
    key = {"space": args.space}
    tables = {}
    for name, kw in (("batched", {"value_batch": args.value_batch}), ("naive", {"naive": True}),
                     ("naive-b2", {"naive": True, "batch_size": 2})):
        t0 = time.perf_counter()
        tables[name] = build_table(model, prepared, sp, rk, key, progress=False, **kw)
        t = tables[name]
        print(f"{name:8s} layer calls {t.layer_evals:6d} / naive {t.naive_layer_evals} "
              f"({t.layer_evals / t.naive_layer_evals:.1%})   MLP token rows {t.token_layers} / naive "
              f"{t.naive_token_layers} ({t.token_layers / t.naive_token_layers:.1%})   {time.perf_counter() - t0:.1f} s")
    for name in ("batched", "naive-b2"):
        worst, rel = largest_difference(tables[name], tables["naive"])
        print(f"{name} vs naive: largest |difference| {worst:.3g}, largest relative (entries > 1e-4) {rel:.3g}")


if __name__ == "__main__":
    main()
