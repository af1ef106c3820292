"""VQA-style scoring: answer normalisation, accuracy, yes/no F1, per-task aggregation, Rel. Avg.

Normalisation follows the rules of the official VQA evaluation script (facts only, our code):

1. lower case; tabs and newlines become spaces;
2. a comma between digits is dropped (``1,000`` -> ``1000``);
3. a period not followed by a digit is dropped (``yes.`` -> ``yes``, ``2.5`` stays);
4. every other punctuation mark ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! : * # % & ^ | ~``
   becomes a space (the official script deletes a mark that touches a space and replaces
   the others with a space; after step 6 the two agree on short answers);
5. number words ``zero`` .. ``twenty`` become digits, the articles ``a``, ``an``, ``the``
   are dropped;
6. runs of whitespace collapse to one space, ends stripped.

Apostrophes are kept and contractions are not rewritten (the official script maps a list
of apostrophe-less contractions such as ``dont`` to ``don't``; short VQA answers almost
never need it).

Accuracy of one prediction (``vqa_accuracy``):

- one reference answer: exact match after normalisation (1.0 or 0.0);
- several reference answers (annotator votes, as in VQAv2): the official VQAv2 soft
  accuracy, ``min(1, matches / 3)`` computed against each subset that leaves one
  reference out, averaged over those subsets. With VQAv2's 10 answers this is the
  10-choose-9 average; a prediction that matches 3 or more of 10 answers scores 1.0.
  Note that the references are votes, not alternatives: two references ``["cat", "dog"]``
  give ``cat`` a score of 1/6, not 1.

Yes/no tasks (every reference normalises to ``yes`` or ``no``) also get precision, recall
and F1 with ``yes`` as the positive class, as POPE reports them; a prediction counts as
``yes`` when its first normalised word is ``yes`` (so ``Yes, there is.`` is a yes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
NUMBER_WORDS["none"] = "0"  # as in the official script
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = set(';/[]"{}()=+\\_->_<@`,?!:*#%&^|~')

_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalise an answer the way VQA evaluation does (see the module docstring)."""
    s = str(text).lower().replace("\n", " ").replace("\t", " ")
    s = _COMMA_IN_NUMBER.sub("", s)
    s = _PERIOD_NOT_DECIMAL.sub("", s)
    s = "".join(" " if ch in PUNCTUATION else ch for ch in s)
    words = [NUMBER_WORDS.get(w, w) for w in s.split()]
    return _WS.sub(" ", " ".join(w for w in words if w not in ARTICLES)).strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return 1.0 if any(p == normalize_answer(a) for a in answers) else 0.0


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Exact match for one reference; VQAv2 leave-one-out soft accuracy for several."""
    answers = list(answers)
    if not answers:
        raise ValueError("vqa_accuracy: a sample needs at least one reference answer")
    if len(answers) == 1:
        return exact_match(prediction, answers)
    p = normalize_answer(prediction)
    hits = [normalize_answer(a) == p for a in answers]
    total = sum(hits)
    # leaving out reference i removes one match iff reference i matched
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


def is_yes_no(answers: Iterable[str]) -> bool:
    """True when every reference answer normalises to ``yes`` or ``no``."""
    norm = [normalize_answer(a) for a in answers]
    return bool(norm) and all(a in ("yes", "no") for a in norm)


def says_yes(prediction: str) -> bool:
    """A yes/no prediction counts as ``yes`` when its first normalised word is ``yes``."""
    words = normalize_answer(prediction).split()
    return bool(words) and words[0] == "yes"


def yes_no_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Precision, recall, F1 (positive class ``yes``) and the share of ``yes`` predictions.

    The truth of a sample is its majority reference (``yes`` on a tie). Precision is 0
    when nothing is predicted ``yes``; recall is 0 when no sample is truly ``yes``.
    """
    if len(predictions) != len(references):
        raise ValueError("yes_no_scores: predictions and references differ in length")
    tp = fp = fn = 0
    for pred, refs in zip(predictions, references):
        norm = [normalize_answer(a) for a in refs]
        truth = norm.count("yes") >= norm.count("no")
        guess = says_yes(pred)
        tp += guess and truth
        fp += guess and not truth
        fn += truth and not guess
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(predictions)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
    }


@dataclass
class TaskScore:
    """Scores of one task: ``accuracy`` is the mean per-sample accuracy in [0, 1]; yes/no
    tasks also carry ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (else None)."""

    task: str
    n: int
    accuracy: float
    yes_no: bool = False
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    yes_ratio: float | None = None

    @classmethod
    def from_dict(cls, task: str, d: dict) -> "TaskScore":
        """The inverse of :meth:`to_dict` (a stored evaluation read back)."""
        return cls(task=task, n=d["n"], accuracy=d["accuracy"], yes_no=d.get("yes_no", False),
                   precision=d.get("precision"), recall=d.get("recall"), f1=d.get("f1"), yes_ratio=d.get("yes_ratio"))

    def to_dict(self) -> dict:
        out = {"n": self.n, "accuracy": self.accuracy, "yes_no": self.yes_no}
        if self.yes_no:
            out.update(precision=self.precision, recall=self.recall, f1=self.f1, yes_ratio=self.yes_ratio)
        return out


@dataclass
class _Bucket:
    preds: list[str] = field(default_factory=list)
    refs: list[list[str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def score_tasks(records: Iterable[Mapping]) -> dict[str, TaskScore]:
    """Per-task scores from records with ``task``, ``prediction`` and ``answers``.

    A record may carry its own ``score``; otherwise ``vqa_accuracy`` is computed. Tasks keep
    the order in which they first appear.
    """
    buckets: dict[str, _Bucket] = {}
    for r in records:
        b = buckets.setdefault(str(r["task"]), _Bucket())
        b.preds.append(str(r["prediction"]))
        b.refs.append(list(r["answers"]))
        s = r.get("score")
        b.scores.append(float(s) if s is not None else vqa_accuracy(r["prediction"], r["answers"]))
    out: dict[str, TaskScore] = {}
    for task, b in buckets.items():
        ts = TaskScore(task=task, n=len(b.scores), accuracy=sum(b.scores) / len(b.scores))
        if all(is_yes_no(refs) for refs in b.refs):
            yn = yes_no_scores(b.preds, b.refs)
            ts.yes_no = True
            ts.precision, ts.recall, ts.f1, ts.yes_ratio = (
                yn["precision"], yn["recall"], yn["f1"], yn["yes_ratio"],
            )
        out[task] = ts
    return out


def _acc(x) -> float:
    return float(x.accuracy if isinstance(x, TaskScore) else x)


def average(tasks: Mapping[str, TaskScore | float]) -> float:
    """Mean accuracy over tasks (each task weighs the same, whatever its sample count)."""
    if not tasks:
        raise ValueError("average: no tasks to average")
    return sum(_acc(v) for v in tasks.values()) / len(tasks)


def rel_avg(pruned: Mapping[str, TaskScore | float], unpruned: Mapping[str, TaskScore | float]) -> float | None:
    """Rel. Avg.: mean over tasks of pruned accuracy / unpruned accuracy (1.0 = no loss).

    Tasks where the unpruned model scores 0 have no ratio and are left out; None when no
    task is left. Both sides must hold the same tasks.
    """
    if set(pruned) != set(unpruned):
        raise ValueError(
            f"rel_avg: pruned and unpruned results cover different tasks "
            f"({sorted(pruned)} vs {sorted(unpruned)})"
        )
    ratios = [_acc(pruned[t]) / _acc(unpruned[t]) for t in unpruned if _acc(unpruned[t]) > 0]
    if not ratios:
        return None
    out = sum(ratios) / len(ratios)
    return out if math.isfinite(out) else None
