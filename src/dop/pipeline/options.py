"""`dop run`'s options (:class:`RunOptions`), their defaults, and every check that needs no
model (:func:`validate_options`). The spaces, compared methods and baselines it accepts are
those registered (:data:`dop.search.SPACES`, :data:`dop.search.METHODS`,
:data:`dop.baselines.BASELINES`); the defaults below are the ones `dop run` compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..baselines import BASELINES
from ..outputs import check_output_dir
from ..rankers import resolve_ranker
from ..search import METHODS, SPACES
from ..search.certify import DEFAULT_CANDIDATES, check_candidates
from ..search.cost import parse_budget
from ..search.robust import DEFAULT_AGGREGATE, check_aggregate

DEFAULT_BUDGETS = ("tokens:1/9", "tokens:2/9", "tokens:1/3")
DEFAULT_BASELINES = ("vispruner", "cdpruner", "fastv", "pdrop", "dart", "spatial", "random")
DEFAULT_SPACES = ("dop", "multigroup")
DEFAULT_METHODS = ("gsop", "shortv", "vtw")  # the compared methods of docs/methods.md
DEFAULT_VERIFY = 10  # random policies per search and budget in the held-out verification


@dataclass
class RunOptions:
    model: str = "demo"
    data: str = "shapes:val"
    test_data: str = "shapes:test"
    samples: int = 25
    test_samples: int = 200
    budgets: tuple[str, ...] = DEFAULT_BUDGETS
    ranker: str = "vispruner"
    spaces: tuple[str, ...] = DEFAULT_SPACES
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    methods: tuple[str, ...] = DEFAULT_METHODS  # searched by their own rules (dop.search.methods)
    out: str | None = None
    seed: int = 0
    max_new_tokens: int = 10
    progress: bool = True
    attn_implementation: str = "sdpa"
    columns: str | None = None  # Hugging Face data sets: "role=column,..." (dop.evaluate.hf)
    # held-out verification of each search (docs/design.md, "Search"): K random policies, on
    # verify_data (default: the samples of data after the searched ones), verify_samples of them
    verify: int = DEFAULT_VERIFY
    verify_data: str | None = None
    verify_samples: int | None = None  # default: as many as samples
    # certified choice among the K best policies by proxy, and how per-sample divergences are
    # aggregated (docs/design.md, "Certified choice", "Robust aggregation")
    candidates: int = DEFAULT_CANDIDATES
    aggregate: str = DEFAULT_AGGREGATE

    def key(self) -> dict:
        d = asdict(self)
        d.pop("out")
        d.pop("progress")
        for name in ("columns", "verify_data", "verify_samples"):
            if d[name] is None:
                d.pop(name)  # keeps the keys of runs made before the option existed
        return d

    def search_key(self) -> dict:
        """The certified-choice options of a space's search stage key (none when they are
        what a search did before they existed: one candidate, the mean)."""
        return {k: v for k, v in (("candidates", self.candidates), ("aggregate", self.aggregate))
                if (k, v) not in (("candidates", 1), ("aggregate", DEFAULT_AGGREGATE))}

    @property
    def heldout_n(self) -> int:
        return self.samples if self.verify_samples is None else self.verify_samples


def validate_options(opts: RunOptions) -> None:
    """Every option that can be checked without the model, before any work (issue 16)."""

    for name in ("samples", "test_samples", "max_new_tokens", "heldout_n"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            flag = "verify_samples" if name == "heldout_n" else name
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {v!r}")
    if isinstance(opts.verify, bool) or not isinstance(opts.verify, int) or opts.verify < 0:
        raise ValueError(f"--verify must be a non-negative integer, got {opts.verify!r}")
    if not opts.verify and (opts.verify_data or opts.verify_samples is not None):
        raise ValueError("--verify-data and --verify-samples apply only with --verify K > 0")
    check_candidates(opts.candidates)
    check_aggregate(opts.aggregate)
    if not opts.budgets:
        raise ValueError("--budgets: give at least one budget")
    for b in opts.budgets:
        parse_budget(b)
    if len(set(opts.budgets)) != len(opts.budgets):
        raise ValueError(f"--budgets: a budget is given twice ({', '.join(opts.budgets)})")
    bad = [s for s in opts.spaces if s not in SPACES]
    if bad:
        raise ValueError(f"--space: unknown search space(s) {', '.join(map(repr, bad))}; known: {', '.join(SPACES)}")
    bad = [m for m in opts.baselines if m not in BASELINES]
    if bad:
        raise ValueError(f"--baselines: unknown method(s) {', '.join(map(repr, bad))}; known: {', '.join(BASELINES)} "
                         "(or 'none')")
    bad = [m for m in opts.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, bad))}; known: {', '.join(METHODS)} "
                         "(or 'none')")
    if not opts.spaces and not opts.baselines and not opts.methods:
        raise ValueError("nothing to compare: give at least one search space, baseline or method")
    resolve_ranker(opts.ranker)
    if opts.out:
        check_output_dir("--out", opts.out)
