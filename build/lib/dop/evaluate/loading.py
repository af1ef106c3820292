"""Load a model and its processor by name, and build the prompt for one image + question.

``demo`` is the bundled demo model (``dop.demo.load_demo``). Anything else is a local folder
holding a saved checkpoint or a hub id (``owner/name``): the config's ``model_type`` picks
the family's class through ``dop.models.model_class_for`` and the processor comes from
``AutoProcessor``. Weights load from safetensors only; ``trust_remote_code`` stays off
unless asked for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

DEMO = "demo"
# "owner/name" as the hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# LLaVA-1.5's short-answer instruction, appended for real checkpoints unless already there
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."

PromptBuilder = Callable[[object, str], str]


class ModelLoadError(ValueError):
    """A model name or folder cannot be loaded; the message says what is accepted."""


def _known_names() -> str:
    return (
        f"{DEMO!r} (the bundled demo model), a local folder holding a saved checkpoint "
        f"(config.json + safetensors + processor files), or a hub id such as 'llava-hf/llava-1.5-7b-hf'"
    )


def load_model(
    name_or_path: str,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """``(model, processor)`` for ``demo``, a local checkpoint folder or a hub id; the
    model is in eval mode. Unknown names raise :class:`ModelLoadError` listing what works."""
    name = str(name_or_path)
    if name == DEMO:
        from dop.demo import load_demo

        model, processor = load_demo(attn_implementation=attn_implementation)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
        return model.eval(), processor
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"model folder {name!r} holds no config.json; expected {_known_names()}")
    elif os.path.exists(name):
        raise ModelLoadError(f"model {name!r} is a file, not a folder; expected {_known_names()}")
    elif not _HUB_ID.match(name):
        if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep in name:
            raise ModelLoadError(f"model folder {name!r} not found; expected {_known_names()}")
        raise ModelLoadError(f"unknown model {name!r}; expected {_known_names()}")

    from transformers import AutoConfig, AutoProcessor

    from dop.models import model_class_for

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:  # hub id that is not cached and cannot be downloaded, etc.
        raise ModelLoadError(
            f"cannot load model {name!r}: no such local folder, and the hub gave no config ({e})"
        ) from None
    cls = model_class_for(config)  # ValueError listing the supported families
    try:
        model = cls.from_pretrained(
            name,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name!r}: {e}") from None
    return model.eval(), processor


def chat_prompt(processor, question: str, *, instruction: str | None = ANSWER_INSTRUCTION,
                num_images: int = 1) -> str:
    """The prompt for a real checkpoint: its chat template applied to one user message
    holding the image (``num_images`` of them) and the question (plus the short-answer
    instruction, unless the question already carries it), with the generation prompt."""
    text = question
    if instruction and instruction.lower() not in question.lower():
        text = f"{question}\n{instruction}"
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(
            f"{type(processor).__name__} has no chat template; save the processor with one "
            f"(processor.chat_template = ...) or pass build_prompt to evaluate()"
        )
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def is_demo_export(path) -> bool:
    """Whether ``path`` is a folder exported by ``scripts/train_demo.py`` (a retrained demo
    model): such a model was trained on the demo's prompt, without the short-answer
    instruction real checkpoints get, and answers garbage with the other."""
    meta = Path(str(path)) / "training.json"
    if not meta.is_file():
        return False
    try:
        command = json.loads(meta.read_text()).get("command", "")
    except (ValueError, AttributeError):
        return False
    return isinstance(command, str) and "train_demo.py" in command


def prompt_builder_for(name_or_path: str) -> PromptBuilder:
    """The prompt builder to use with the model loaded from ``name_or_path``: the demo's
    own format for ``demo`` and for a folder exported by ``scripts/train_demo.py`` (it holds
    that script's ``training.json``), :func:`chat_prompt` otherwise."""
    if str(name_or_path) == DEMO or is_demo_export(name_or_path):
        from dop.demo import build_prompt

        return build_prompt
    return chat_prompt


def num_decoder_layers(model) -> int:
    """Decoder layer count of a loaded model, through its family's adapter."""
    from dop.models import get_adapter

    return int(get_adapter(model).num_layers)
