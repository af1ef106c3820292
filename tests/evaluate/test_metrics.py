"""Hand-worked cases for dop.evaluate.metrics: normalisation, accuracy, yes/no F1, Rel. Avg."""

from __future__ import annotations

import pytest

from dop.evaluate.metrics import (
    average,
    exact_match,
    is_yes_no,
    normalize_answer,
    rel_avg,
    says_yes,
    score_tasks,
    vqa_accuracy,
    yes_no_scores,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("  YES!  ", "yes"),
        ("The red circle", "red circle"),
        ("a cat", "cat"),
        ("an apple", "apple"),
        ("two", "2"),
        ("Three dogs", "3 dogs"),
        ("none", "0"),
        ("twenty", "20"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("3.", "3"),
        ("left, above", "left above"),
        ("x-ray", "x ray"),
        ("(red)", "red"),
        ("red\nand\tblue", "red and blue"),
        ("don't", "don't"),
        ("AE", "ae"),
        ("", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize(
    "pred, answers, acc",
    [
        ("Red", ["red"], 1.0),
        ("red.", ["red"], 1.0),
        ("a red", ["red"], 1.0),
        ("blue", ["red"], 0.0),
        ("red circle", ["red"], 0.0),  # exact match, not containment
        ("Two", ["2"], 1.0),
        # VQAv2 soft accuracy: average over the 10 leave-one-out subsets of min(1, matches / 3)
        ("cat", ["cat"] * 10, 1.0),
        ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0),  # 4 x min(1, 3/3) + 6 x min(1, 4/3)
        ("cat", ["cat"] * 3 + ["dog"] * 7, 0.9),  # (3 x 2/3 + 7 x 1) / 10
        ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
        ("cat", ["cat"] * 1 + ["dog"] * 9, 0.3),  # (1 x 0 + 9 x 1/3) / 10
        ("cow", ["cat"] * 1 + ["dog"] * 9, 0.0),
        ("cat", ["cat", "dog"], 1 / 6),  # (1 x 0 + 1 x 1/3) / 2: votes, not alternatives
    ],
)
def test_vqa_accuracy(pred, answers, acc):
    assert vqa_accuracy(pred, answers) == pytest.approx(acc)


def test_exact_match_any_reference():
    assert exact_match("dog", ["cat", "Dog."]) == 1.0
    assert exact_match("cow", ["cat", "dog"]) == 0.0


def test_vqa_accuracy_needs_a_reference():
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize(
    "pred, yes", [("yes", True), ("Yes, there is.", True), ("YES.", True), ("no", False), ("", False), ("yesterday", False)]
)
def test_says_yes(pred, yes):
    assert says_yes(pred) is yes


def test_yes_no_scores_hand_worked():
    # truth: yes yes yes no no ; predictions: yes no yes yes no -> tp 2, fn 1, fp 1, tn 1
    refs = [["yes"], ["yes"], ["Yes"], ["no"], ["no"]]
    preds = ["yes", "no", "Yes.", "yes", "No"]
    s = yes_no_scores(preds, refs)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 5)


def test_yes_no_scores_degenerate():
    # always "no": no positive predictions -> precision 0, F1 0
    s = yes_no_scores(["no", "no"], [["yes"], ["no"]])
    assert (s["precision"], s["recall"], s["f1"], s["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    # always "yes" on a balanced set: precision 1/2, recall 1, F1 2/3
    s = yes_no_scores(["yes", "yes"], [["yes"], ["no"]])
    assert s["f1"] == pytest.approx(2 / 3)


def test_is_yes_no():
    assert is_yes_no(["Yes", "no."])
    assert not is_yes_no(["yes", "maybe"])
    assert not is_yes_no([])


def test_score_tasks_per_task_and_f1_only_for_yes_no():
    records = [
        {"task": "exist", "prediction": "yes", "answers": ["yes"]},
        {"task": "exist", "prediction": "yes", "answers": ["no"]},
        {"task": "color", "prediction": "red", "answers": ["red"]},
        {"task": "color", "prediction": "blue", "answers": ["red"]},
        {"task": "color", "prediction": "red", "answers": ["red"]},
        {"task": "count", "prediction": "two", "answers": ["2"]},
    ]
    tasks = score_tasks(records)
    assert list(tasks) == ["exist", "color", "count"]
    assert tasks["exist"].accuracy == 0.5 and tasks["exist"].n == 2
    assert tasks["exist"].yes_no and tasks["exist"].f1 == pytest.approx(2 / 3)
    assert tasks["color"].accuracy == pytest.approx(2 / 3) and not tasks["color"].yes_no
    assert tasks["color"].f1 is None and "f1" not in tasks["color"].to_dict()
    assert tasks["count"].accuracy == 1.0
    # average: each task weighs the same (not the 4/6 micro average)
    assert average(tasks) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_score_tasks_uses_given_scores():
    tasks = score_tasks([{"task": "t", "prediction": "x", "answers": ["y"], "score": 0.25}])
    assert tasks["t"].accuracy == 0.25


@pytest.mark.parametrize(
    "pruned, unpruned, expected",
    [
        ({"a": 0.8, "b": 0.5}, {"a": 0.8, "b": 0.5}, 1.0),
        ({"a": 0.4, "b": 0.5}, {"a": 0.8, "b": 0.5}, 0.75),  # (0.5 + 1.0) / 2
        ({"a": 0.9, "b": 0.3}, {"a": 0.6, "b": 0.6}, 1.0),  # (1.5 + 0.5) / 2: gains count too
        ({"a": 0.2, "b": 0.1}, {"a": 0.4, "b": 0.0}, 0.5),  # task b has no ratio: left out
        ({"a": 0.2}, {"a": 0.0}, None),
    ],
)
def test_rel_avg(pruned, unpruned, expected):
    got = rel_avg(pruned, unpruned)
    assert got == (None if expected is None else pytest.approx(expected))


def test_rel_avg_needs_same_tasks():
    with pytest.raises(ValueError, match="different tasks"):
        rel_avg({"a": 1.0}, {"b": 1.0})


def test_average_needs_tasks():
    with pytest.raises(ValueError):
        average({})
