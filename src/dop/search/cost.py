"""Exact decoder FLOPs of policies at a reference prompt shape, and budgets.

The search prices policies at one *reference shape*: the visual-token count of each image
and the text-token count of a typical validation prompt. A layer's cost is the same integer
formula :func:`dop.count_flops` sums (``dop``: all matrix products incl. text rows;
``paper``: multiply-adds over visual tokens only), so :meth:`CostModel.policy_cost` equals
``count_flops(...).decoder`` exactly; the solver checks its answer against it.

A layer's cost splits exactly into an attention part, which couples the query and key/value
row counts (the ``n_q x n_kv`` score and value products), and an MLP part, linear in its rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import flops as _flops
from ..policy import Policy


class BudgetError(ValueError):
    """A budget is malformed or cannot be met."""


class CostModel:
    def __init__(self, model, visual_counts: list[int], text_tokens: int, convention: str = "dop"):
        if convention not in _flops.CONVENTIONS:
            raise BudgetError(f"convention must be one of {', '.join(_flops.CONVENTIONS)}, got {convention!r}")
        self.model = model
        self.arch = _flops.resolve_arch(model).decoder
        self.counts = [int(n) for n in visual_counts]
        self.text = int(text_tokens)
        self.convention = convention
        self.L = self.arch.num_layers

    # -- one layer, given the visual rows each op processes ---------------------------
    def layer(self, vq: int, vkv: int, vm: int) -> int:
        if self.convention == "paper":
            return _flops._paper_layer_macs(self.arch, vq, vkv, vm)
        t = self.text
        return _flops._decoder_layer_flops(self.arch, t + vq, t + vkv, t + vm)

    def attn(self, vq: int, vkv: int) -> int:
        """Attention part of a layer (q/k/v/o projections, scores, weighted values)."""
        if self.convention == "paper":
            return _flops._paper_layer_macs(self.arch, vq, vkv, 0)
        t = self.text
        return _flops._decoder_layer_flops(self.arch, t + vq, t + vkv, 0)

    def mlp(self, vm: int) -> int:
        """MLP part of a layer; linear in ``vm``: ``mlp(0) + vm * mlp_slope``."""
        if self.convention == "paper":
            return _flops._paper_layer_macs(self.arch, 0, 0, vm)
        return _flops._decoder_layer_flops(self.arch, 0, 0, self.text + vm)

    @property
    def mlp_slope(self) -> int:
        return self.mlp(1) - self.mlp(0)

    # -- whole policies -------------------------------------------------------------------
    def group_sizes(self, policy_or_groups) -> list[int]:
        """Visual tokens of each group summed over the reference images."""
        groups = policy_or_groups.groups if isinstance(policy_or_groups, Policy) else list(policy_or_groups)
        probe = Policy(self.L, groups)
        sizes = [0] * len(groups)
        for n in self.counts:
            for g, (s, e) in enumerate(probe.group_bounds(n)):
                sizes[g] += e - s
        return sizes

    def policy_cost(self, policy: Policy | None) -> int:
        if policy is None:
            v = sum(self.counts)
            return self.L * self.layer(v, v, v)
        sizes = self.group_sizes(policy)
        # per kind: (depth, layers skipped below it) of each group (docs/design.md, "Per-layer skips")
        q, kv, m = (list(zip(policy.kind_depths(k), policy.kind_skip(k))) for k in ("attn_q", "attn_kv", "mlp"))

        def rows(kind, l):
            return sum(s for s, (d, skipped) in zip(sizes, kind) if l < d and l not in skipped)

        return sum(self.layer(rows(q, l), rows(kv, l), rows(m, l)) for l in range(self.L))

    @property
    def unpruned(self) -> int:
        return self.policy_cost(None)

    def count_flops(self, policy: Policy | None, convention: str | None = None):
        """``dop.count_flops`` at the reference shape (the check the solver's answer must pass)."""
        return _flops.count_flops(
            self.model, policy, num_visual_tokens=list(self.counts), num_text_tokens=self.text,
            convention=convention or self.convention,
        )


# ---------------------------------------------------------------------- budgets
_TFLOPS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(t|tf|tflops?)\s*$", re.IGNORECASE)
_TOKENS = re.compile(r"^\s*(?:tokens?:\s*([0-9]+)|([0-9]+)\s*tok(?:ens?)?)\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*tokens?:\s*([0-9]+)\s*/\s*([0-9]+)\s*$", re.IGNORECASE)

BUDGET_HELP = (
    "a fraction of the unpruned decoder FLOPs (0.14 or 14%), absolute decoder TFLOPs (2.5T), both in "
    "--convention (default dop), or the FLOPs of keeping N visual tokens (tokens:64) or a share of them "
    "(tokens:1/9) at every layer, always in the paper convention"
)
DEFAULT_CONVENTION = "dop"  # of fraction and TFLOPs budgets, in every command and in the API


@dataclass(frozen=True)
class Budget:
    kind: str  # "fraction" | "tflops" | "tokens"
    value: float  # the fraction, the TFLOPs, or the tokens kept (a share of them when share=True)
    spec: str
    share: bool = False

    def __str__(self) -> str:
        return self.spec

    def convention(self, default: str) -> str:
        return "paper" if self.kind == "tokens" else default

    def limit(self, cost: CostModel) -> int:
        """The largest allowed decoder cost (an integer) under ``cost``'s convention."""
        if self.kind == "fraction":
            return int(self.value * cost.unpruned + 1e-6)
        if self.kind == "tflops":
            return int(self.value * 1e12)
        n_ref = max(cost.counts)
        n = self.tokens(n_ref)
        frac = _flops.budget_from_tokens(cost.model, n, n_ref, num_images=len(cost.counts))
        return int(round(frac * cost.unpruned))

    def tokens(self, n_visual: int) -> int:
        """The number of visual tokens a ``tokens:`` budget keeps out of ``n_visual``."""
        if self.kind != "tokens":
            raise BudgetError(f"budget {self.spec!r} is not a token count")
        n = int(round(self.value * n_visual)) if self.share else int(self.value)
        if not 0 <= n <= n_visual:
            raise BudgetError(f"budget {self.spec!r}: the images hold {n_visual} visual tokens, cannot keep {n}")
        if n == 0:
            raise BudgetError(f"budget {self.spec!r} keeps no visual token of {n_visual}; give a larger share")
        return n

    def describe(self, cost: CostModel) -> str:
        lim = self.limit(cost)
        unit = "TMACs (paper)" if cost.convention == "paper" else "TFLOPs"
        return f"{self.spec} = {lim / 1e12:.4g} {unit} = {lim / cost.unpruned:.4f} of the unpruned decoder"


def parse_budget(spec) -> Budget:
    """``0.14`` (fraction), ``2.5T`` / ``2.5tflops`` (absolute decoder TFLOPs), ``tokens:64`` / ``64tok``."""
    if isinstance(spec, Budget):
        return spec
    if isinstance(spec, bool):
        raise BudgetError(f"budget must be {BUDGET_HELP}; got {spec!r}")
    if isinstance(spec, (int, float)):
        text, value = repr(spec), float(spec)
        return _fraction(value, text)
    text = str(spec).strip()
    m = _SHARE.match(text)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b == 0 or a > b or a == 0:
            raise BudgetError(f"budget {text!r}: a token share a/b needs 0 < a <= b")
        return Budget("tokens", a / b, text, share=True)
    m = _TOKENS.match(text)
    if m:
        n = int(m.group(1) or m.group(2))
        if n == 0:
            raise BudgetError(f"budget {text!r} keeps no visual token: the image would be ignored; "
                              "give tokens:N with N >= 1")
        return Budget("tokens", float(n), text)
    m = _TFLOPS.match(text)
    if m:
        v = float(m.group(1))
        if v <= 0:
            raise BudgetError(f"budget {text!r}: TFLOPs must be positive")
        return Budget("tflops", v, text)
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise BudgetError(f"budget {text!r} not understood; give {BUDGET_HELP}") from None
    return _fraction(value, text)


def _fraction(value: float, text: str) -> Budget:
    if not (0.0 < value <= 1.0) or value != value:
        hint = f"; for absolute TFLOPs write {text}T, for a token equivalent tokens:N" if value > 1 else ""
        raise BudgetError(f"budget {text}: a fraction of the unpruned decoder FLOPs must lie in (0, 1]{hint}")
    return Budget("fraction", value, text)


def largest_fitting(fits, hi: int) -> int | None:
    """The largest ``k`` in ``[0, hi]`` with ``fits(k)``, for a ``fits`` true up to some
    ``k`` and false after (a cost monotone in ``k`` against a limit), by bisection; None when
    even ``fits(0)`` is false."""
    if not fits(0):
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
