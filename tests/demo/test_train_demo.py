"""The demo's training script: its training-only labels agree with the drawn scene, and a
tiny run trains, checkpoints, resumes and exports a plain LLaVA checkpoint."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dop.demo import shapes

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


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
    # the export declares its prompt (dop_prompt.json); training.json is not what says so
    from dop.demo import build_prompt
    from dop.evaluate.loading import prompt_builder_for

    (tmp_path / "w" / "training.json").unlink()
    assert prompt_builder_for(str(tmp_path / "w")) is build_prompt
    first = {k: v.clone() for k, v in model.state_dict().items()}
    # a longer schedule resumes from the checkpoint instead of starting again
    assert td.main([*args[: args.index("--steps") + 1], "3", *args[args.index("--steps") + 2:]]) == 0
    log = (tmp_path / "ck" / "t" / "train.log").read_text()
    assert "resumed from" in log and "final stage B step 3" in log
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w").state_dict()
    assert any(not torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_op_dropout_matches_the_pruning_runtime(td, attn):
    """Training-time dropout (compute and mask) gives the runtime's logits (gather and skip)
    for the same depths; with no depths set it leaves the model unchanged."""
    from tiny_models import IMAGE_TOKEN, build_inputs, build_model

    from dop.policy import Policy
    from dop.runtime import apply_policy

    model = build_model("llava", attn=attn, num_layers=4)
    inputs, _ = build_inputs(model, "llava", num_images=1)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    drop = td.OpDropout(model)
    with torch.no_grad():
        full = model(**inputs).logits
        for a, m in [(2, 1), (0, 3), (3, 0), (1, 1)]:
            pol = Policy.from_dict({"format": "dop-policy/1", "num_layers": 4, "groups": [1.0],
                                    "depth": {"attn": [a], "mlp": [m]}})
            with apply_policy(model, pol, "identity"):
                want = model(**inputs).logits
            drop.depths = (torch.where(visual, a, 4), torch.where(visual, m, 4))
            got = model(**inputs).logits
            drop.depths = None
            assert torch.allclose(got, want, atol=1e-5), (a, m, (got - want).abs().max())
            assert not torch.allclose(got, full, atol=1e-3)
        assert torch.equal(model(**inputs).logits, full)


def test_op_depths_spare_text_and_the_objects_asked_about(td):
    grid, layers, B = 12, 8, 64
    visual, roles = torch.zeros(B, 160, dtype=torch.bool), torch.zeros(B, 144, dtype=torch.long)
    visual[:, 10:154] = True
    for b in range(B):
        roles[b, (7 * b) % 144] = 1 + b % 2
    (attn, mlp), clean = td.draw_op_depths(visual, roles, grid, layers, seed=0, first=0, p_depth=0.4, p_tokens=0.3)
    again = td.draw_op_depths(visual, roles, grid, layers, seed=0, first=0, p_depth=0.4, p_tokens=0.3)
    assert torch.equal(attn, again[0][0]) and torch.equal(mlp, again[0][1]) and torch.equal(clean, again[1])
    assert (attn[~visual] == layers).all() and (mlp[~visual] == layers).all()  # text is never touched
    assert (attn[clean] == layers).all() and (mlp[clean] == layers).all()
    assert 0.2 < (~clean).float().mean() < 0.8  # about 1 - 0.6 * 0.7 of the samples
    for b in range(B):
        c = (7 * b) % 144
        r, k = divmod(c, grid)
        near = [10 + rr * grid + kk for rr in range(max(0, r - 1), min(grid, r + 2))
                for kk in range(max(0, k - 1), min(grid, k + 2))]
        assert (attn[b, near] > 0).all()  # the object asked about and its neighbours keep a depth
        v = attn[b, visual[b]]
        depths = set(v.tolist()) - {0}
        assert len(depths) == 1  # one depth per sample for the tokens that are not dropped
        assert (v == 0).sum() <= int(0.9 * (144 - len(near)))


def test_fine_tune_with_op_dropout_starts_from_an_export(td, tmp_path):
    from transformers import LlavaForConditionalGeneration

    tiny = ["--batch", "4", "--width", "32", "--layers", "2", "--heads", "2", "--vision-width", "32",
            "--vision-layers", "1", "--aux-layers", "1", "--attn-layers", "0,1", "--deep-layers", "1",
            "--eval-n", "5", "--eval-every", "1000", "--ckpt-root", str(tmp_path / "ck")]
    assert td.main(["--name", "a", "--export-dir", str(tmp_path / "a"), "--tower-steps", "1", "--steps", "1", *tiny]) == 0
    start = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()

    def tune(name, steps, *extra):
        assert td.main(["--name", name, "--export-dir", str(tmp_path / name), "--init-from", str(tmp_path / "a"),
                        "--tower-steps", "0", "--steps", steps, *extra, *tiny]) == 0
        return LlavaForConditionalGeneration.from_pretrained(tmp_path / name).state_dict()

    # no step: the export is the starting point itself, not the fresh model of the same seed
    same = tune("b0", "0")
    assert all(torch.equal(start[k], same[k]) for k in start)
    # with operation and token dropout on every sample it trains
    tuned = tune("b2", "2", "--lr", "1e-2", "--op-depth-frac", "1", "--op-token-frac", "1")
    assert "final stage B step 2" in (tmp_path / "ck" / "b2" / "train.log").read_text()
    assert any(not torch.equal(start[k], tuned[k]) for k in start)
