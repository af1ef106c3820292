"""The control demo model (issue 17, item 5): ``demo-base``, the from-scratch weights that
preceded the pruning fine-tunes, is accepted wherever ``demo`` is."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

import dop.demo
from dop.evaluate.loading import load_model, prompt_builder_for, prompt_builder_for_model
from dop.flops import count_flops, resolve_arch
from dop.names import canonical_model_name, same_model

ROOT = Path(__file__).resolve().parents[2]


def test_demo_base_ships_beside_demo_with_the_same_configs():
    base, demo = dop.demo.DEMO_BASE_DIR, dop.demo.DEMO_DIR
    names = {p.name for p in demo.iterdir()}
    assert names == {p.name for p in base.iterdir()}
    for name in names - {"model.safetensors", "training.json"}:
        assert (base / name).read_bytes() == (demo / name).read_bytes(), name
    training = json.loads((base / "training.json").read_text())
    assert "init_from" not in training["args"] and "--init-from" not in training["command"]  # from scratch
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dop"]
    assert "demo/weights-base/*" in package_data


@pytest.fixture(scope="module")
def both():
    return load_model("demo"), load_model("demo-base")


def test_demo_base_loads_with_its_own_weights_and_the_demo_prompt(both):
    (demo, _), (base, processor) = both
    assert type(base) is type(demo) and base.config.to_dict()["text_config"] == demo.config.to_dict()["text_config"]
    w = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(base.state_dict()[w], demo.state_dict()[w])
    assert prompt_builder_for("demo-base") is dop.demo.build_prompt
    assert prompt_builder_for_model(base) is dop.demo.build_prompt
    assert not same_model("demo", "demo-base") and canonical_model_name("demo-base") == str(dop.demo.DEMO_BASE_DIR.resolve())


def test_demo_base_has_the_demo_flops_preset():
    assert resolve_arch("demo-base").decoder == resolve_arch("demo").decoder
    a, b = (count_flops(m, num_visual_tokens=144, num_text_tokens=19) for m in ("demo", "demo-base"))
    assert a.decoder == b.decoder > 0


def test_an_unknown_demo_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown demo model 'demo-x'; known: demo, demo-base"):
        dop.demo.load_demo(name="demo-x")
