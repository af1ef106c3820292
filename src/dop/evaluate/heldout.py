"""Samples a search did not use, for its held-out verification (docs/design.md, "Search"):
``--verify-data SPEC``, or by default the samples of ``--data`` that follow the searched
ones (every loader keeps the order of its source, so the first N are the searched ones)."""

from __future__ import annotations

from .datasets import Sample, load_dataset
from .hf import is_hf_spec


def heldout_samples(data: str, searched: int, n: int, verify_data: str | None = None,
                    columns: str | None = None) -> tuple[list[Sample], str]:
    """``(samples, where they come from)``: ``n`` samples of ``verify_data``, or the ``n``
    samples of ``data`` after its first ``searched`` (fewer, or none, where ``data`` ends
    sooner; the description says so). ``columns`` applies to whichever is a Hugging Face data
    set."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--verify-samples must be a positive integer, got {n!r}")
    if verify_data:
        rows = load_dataset(verify_data, limit=n, columns=columns if is_hf_spec(verify_data) else None)
        return rows, f"{verify_data} ({len(rows)} samples)"
    rows = load_dataset(data, limit=searched + n, columns=columns if is_hf_spec(data) else None)[searched:]
    if not rows:
        return [], f"none: {data} holds no samples after the {searched} searched"
    return rows, f"{data} samples {searched + 1}-{searched + len(rows)}, after the {searched} searched"
