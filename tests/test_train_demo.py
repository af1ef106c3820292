"""The demo's training script: its training-only labels agree with the drawn scene, and a
tiny run trains, checkpoints, resumes and exports a plain LLaVA checkpoint."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dop.demo import shapes

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def td():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("train_demo", SCRIPTS / "train_demo.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(SCRIPTS))


def _cell(o, grid=12, patch=8):
    return min(grid - 1, int(o.cy // patch)) * grid + min(grid - 1, int(o.cx // patch))


def test_asked_attributes(td):
    assert td.asked_attributes("Is there a red circle?") == (["red"], ["circle"])
    assert td.asked_attributes("How many crosses are there?") == ([], ["cross"])
    assert td.asked_attributes("Where is the blue square relative to the red triangle?") == (
        ["blue", "red"], ["square", "triangle"])
    assert td.asked_attributes("What is written on the label?") == ([], [])


@pytest.mark.parametrize("task", shapes.TASKS)
def test_patch_labels_follow_the_scene(td, task):
    for i in range(12):
        s, scene = shapes.make_sample("train", 3, i, task)
        lab = td.patch_labels(scene, 12, 8, s["question"])
        colors, kinds = td.asked_attributes(s["question"])
        objs = [o for o in scene.objects if o.kind != "label"]
        cells = {_cell(o) for o in objs}
        assert len(cells) == len(objs)  # one object centre per patch
        empty = [k for k in range(144) if k not in cells]
        assert (lab[:3, empty] == 0).all() and (lab[3:, empty] == -100).all()
        for o in objs:
            c = _cell(o)
            assert lab[2, c] == o.role
            if o.kind == "shape":
                assert lab[0, c] == td.KIND_INDEX[o.name] and lab[1, c] == td.COLOR_INDEX[o.color]
            want_c = -100 if not colors else (colors.index(o.color) + 1 if o.color in colors[:2] else 0)
            want_s = -100 if not kinds else (kinds.index(o.name) + 1 if o.name in kinds[:2] else 0)
            assert lab[3, c] == want_c and lab[4, c] == want_s
            if task == "exist" and o.role == 1:  # the object asked about matches both ways
                assert lab[3, c] == 1 and lab[4, c] == 1
        if task == "exist" and s["answers"][0] == "no":  # hard negatives: half matches only
            both = [o for o in objs if lab[3, _cell(o)] == 1 and lab[4, _cell(o)] == 1]
            half = [o for o in objs if (lab[3, _cell(o)] == 1) != (lab[4, _cell(o)] == 1)]
            assert not both and len(half) >= 2


def test_balanced_ce_per_class_ignoring_unlabelled(td):
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = 5.0  # confident and right on the rare class
    target = torch.tensor([[1, 0, 0, -100]])
    ce = torch.nn.functional.cross_entropy(logits[0], target[0].clamp(min=0), reduction="none")
    want = (ce[0] + ce[1:3].mean()) / 2  # class 1 and class 0 weigh the same
    assert torch.allclose(td.balanced_ce(logits, target, groups=target), want)
    none = td.balanced_ce(logits, torch.full((1, 4), -100), groups=torch.full((1, 4), -100))
    assert none.item() == 0.0 and none.requires_grad is False


def test_tiny_run_checkpoints_resumes_and_exports(td, tmp_path):
    from transformers import LlavaForConditionalGeneration

    args = ["--name", "t", "--ckpt-root", str(tmp_path / "ck"), "--export-dir", str(tmp_path / "w"),
            "--tower-steps", "2", "--steps", "2", "--batch", "4", "--width", "32", "--layers", "2", "--heads", "2",
            "--vision-width", "32", "--vision-layers", "1", "--aux-layers", "1", "--attn-layers", "0,1",
            "--deep-layers", "1", "--match-weight", "1", "--deep-weight", "0.3", "--eval-n", "5", "--eval-every", "1000"]
    assert td.main(args) == 0
    log = (tmp_path / "ck" / "t" / "train.log").read_text()
    assert "final stage B step 2" in log
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w")
    assert model.config.text_config.num_hidden_layers == 2
    first = {k: v.clone() for k, v in model.state_dict().items()}
    # a longer schedule resumes from the checkpoint instead of starting again
    assert td.main([*args[: args.index("--steps") + 1], "3", *args[args.index("--steps") + 2:]]) == 0
    log = (tmp_path / "ck" / "t" / "train.log").read_text()
    assert "resumed from" in log and "final stage B step 3" in log
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w").state_dict()
    assert any(not torch.equal(first[k], again[k]) for k in first)
