"""The bundled demo model loads from its folder and is the promised architecture."""

from __future__ import annotations

import pytest
import torch

from dop.demo import DEMO_DIR, build_prompt, load_demo
from dop.demo import shapes

needs_weights = pytest.mark.skipif(
    not (DEMO_DIR / "model.safetensors").is_file(), reason="demo weights not trained yet"
)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@needs_weights
def test_load_demo_architecture(demo):
    model, processor = demo
    from transformers import LlavaForConditionalGeneration

    assert isinstance(model, LlavaForConditionalGeneration)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.text_config.num_hidden_layers >= 8
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama"
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 40 * 2**20


@needs_weights
def test_prompt_has_144_image_tokens_and_generates_an_answer(demo):
    model, processor = demo
    sample = shapes.make_samples("test", 1, seed=123)[0]
    prompt = build_prompt(processor, sample["question"])
    assert prompt.count("<image>") == 1
    enc = processor(images=[sample["image"]], text=[prompt], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_index).sum()) >= 144
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer in [a.lower() for a in shapes.ANSWER_SETS["exist"]]


def test_missing_weights_error(monkeypatch, tmp_path):
    import dop.demo as demo_pkg

    monkeypatch.setattr(demo_pkg, "DEMO_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train_demo.py"):
        demo_pkg.load_demo()


@needs_weights
@pytest.mark.parametrize("ranker", ["pdrop", "fastv", "dart"])
def test_in_llm_rankers_on_the_demo(demo, ranker):
    """Issue 15: PyramidDrop's default stages are a share of the depth, so `pdrop` ranks the
    8-layer demo's tokens (it asked for stage layer 24 before); FastV / DART alike."""
    import dop

    model, processor = demo
    sample = shapes.make_samples("test", 1, seed=7)[0]
    enc = processor(images=[sample["image"]], text=[build_prompt(processor, sample["question"])], return_tensors="pt")
    (perm,) = dop.rank_visual_tokens(model, dict(enc), ranker, 36)
    assert sorted(perm) == list(range(144))
