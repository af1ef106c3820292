"""Whether the prefill times of a run can be trusted (the load of the machine and the spread of
each method's per-sample times), and the machine the run was made on."""

from __future__ import annotations

import os
import platform

import torch

BUSY_CV = 0.3  # per-sample prefill times spread more than this (std / mean): timing is noisy


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def timing_note(rows: list[dict], load_before: float | None) -> dict:
    """Whether the prefill-time column can be trusted: the 1-minute load average before and
    after the run against the CPU count, and the spread of each method's per-sample times."""
    cpus = os.cpu_count() or 1
    loads = [x for x in (load_before, load_average()) if x is not None]
    for r in rows:
        r["prefill_noisy"] = (r.get("prefill_cv") or 0) > BUSY_CV
    noisy = sorted({r["method"] for r in rows if r["prefill_noisy"]})
    busy = bool(loads) and max(loads) > cpus
    return dict(cpus=cpus, load_average=loads, busy=busy, noisy=noisy, cv_threshold=BUSY_CV,
                trusted=not busy and not noisy)


def spread(values: list) -> float | None:
    """Coefficient of variation (std / mean) of the per-sample prefill times."""
    xs = [float(v) for v in values if v is not None]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return (var ** 0.5) / mean if mean > 0 else None
