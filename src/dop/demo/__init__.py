"""The bundled demo MLLM (a small LLaVA trained from scratch on the `shapes` benchmark) and
the benchmark generator. See README.md in this folder."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["DEMO_DIR", "load_demo", "build_prompt"]


def load_demo(attn_implementation: str = "sdpa"):
    """Load the demo model and its processor: ``(LlavaForConditionalGeneration, LlavaProcessor)``,
    in eval mode and float32."""
    if not (DEMO_DIR / "model.safetensors").is_file() or not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"demo weights not found in {DEMO_DIR}; train them with "
            "`python scripts/train_demo.py` (see src/dop/demo/README.md)"
        )
    import torch  # lazy: spares torch until used
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # lazy: spares transformers until used

    model = LlavaForConditionalGeneration.from_pretrained(
        DEMO_DIR, dtype=torch.float32, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(DEMO_DIR)
    return model.eval(), processor


def build_prompt(processor, question: str) -> str:
    """The prompt format the demo model was trained on (see :func:`dop.demo.model.build_prompt`)."""
    from .model import build_prompt as _build  # lazy: spares PIL, numpy until used

    return _build(processor, question)
