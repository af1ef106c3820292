"""The bundled demo MLLM (a small LLaVA trained from scratch on the `shapes` benchmark) and
the benchmark generator. See README.md in this folder.

Two demo models ship: ``demo`` (``weights/``: the from-scratch run fine-tuned with operation
and token dropout) and ``demo-base`` (``weights-base/``: the same from-scratch run before the
fine-tunes, a control trained for neither kind of pruning)."""

from __future__ import annotations

from pathlib import Path

from .model import build_prompt

DEMO_DIR = Path(__file__).resolve().parent / "weights"
DEMO_BASE_DIR = Path(__file__).resolve().parent / "weights-base"
DEMOS = ("demo", "demo-base")  # the names every command's --model accepts

__all__ = ["DEMOS", "DEMO_BASE_DIR", "DEMO_DIR", "demo_dir", "load_demo", "build_prompt"]


def demo_dir(name: str = "demo") -> Path:
    """The weights folder of a bundled demo model (``demo`` or ``demo-base``), looked up when
    called."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMOS)}")
    return DEMO_DIR if name == "demo" else DEMO_BASE_DIR


def load_demo(attn_implementation: str = "sdpa", name: str = "demo"):
    """Load a bundled demo model (``name``: ``demo`` or ``demo-base``) and its processor:
    ``(LlavaForConditionalGeneration, LlavaProcessor)``, in eval mode and float32."""
    folder = demo_dir(name)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} weights not found in {folder}; train them with "
            "`python scripts/train_demo.py` (see src/dop/demo/README.md)"
        )
    import torch  # heavy: torch, only when the demo model is loaded
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # heavy: transformers, likewise

    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor

