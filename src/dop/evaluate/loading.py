"""Load a model and its processor by name, and build the prompt for one image + question.

``demo`` and ``demo-base`` are the bundled demo models (``dop.demo.load_demo``). Anything else is a local folder
holding a saved checkpoint or a hub id (``owner/name``): the config's model type picks
the family's class through ``dop.models.model_class_for`` and the processor comes from
``AutoProcessor``. Weights load from safetensors only; ``trust_remote_code`` stays off
unless asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from .. import demo
from ..jsonio import write_json_atomic
from ..models import get_adapter, model_class_for
from ..names import DEMO, DEMO_BASE, bundled_dir, is_hub_id, looks_like_path

PROMPT_MARKER = "dop_prompt.json"  # a checkpoint folder's declared prompt format (write_prompt_marker)
PROMPT_FORMAT = "dop-prompt/1"
# LLaVA-1.5's short-answer instruction, appended for real checkpoints unless already there
ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."

PromptBuilder = Callable[[object, str], str]


class ModelLoadError(ValueError):
    """A model name or folder cannot be loaded; the message says what is accepted."""


def _known_names() -> str:
    return (
        f"{DEMO!r} (the bundled demo model), {DEMO_BASE!r} (its control, not trained for pruning), a local folder holding a saved checkpoint "
        f"(config.json + safetensors + processor files), or a hub id such as 'llava-hf/llava-1.5-7b-hf'"
    )


def load_model(
    name_or_path: str,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """``(model, processor)`` for ``demo``, ``demo-base``, a local checkpoint folder or a hub
    id; the model is in eval mode. Unknown names raise :class:`ModelLoadError` listing what
    works."""
    name = str(name_or_path)
    if bundled_dir(name) is not None:
        with _weights_errors(name):
            model, processor = demo.load_demo(attn_implementation=attn_implementation, name=name)
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
        return model.eval(), processor
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"model folder {name!r} holds no config.json; expected {_known_names()}")
    elif os.path.exists(name):
        raise ModelLoadError(f"model {name!r} is a file, not a folder; expected {_known_names()}")
    elif not is_hub_id(name):
        if looks_like_path(name):
            raise ModelLoadError(f"model folder {name!r} not found; expected {_known_names()}")
        raise ModelLoadError(f"unknown model {name!r}; expected {_known_names()}")

    from transformers import AutoConfig, AutoProcessor  # heavy: transformers, only when a model is loaded

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:  # hub id that is not cached and cannot be downloaded, etc.
        raise ModelLoadError(
            f"cannot load model {name!r}: no such local folder, and the hub gave no config ({e})"
        ) from None
    cls = model_class_for(config)  # ValueError listing the supported families
    try:
        with _weights_errors(name):
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


@contextlib.contextmanager
def _weights_errors(name: str):
    """A damaged weights file (truncated, not safetensors) as one :class:`ModelLoadError`
    line naming the model, instead of the safetensors library's own exception."""
    try:
        yield
    except SafetensorError as e:
        raise ModelLoadError(
            f"cannot load model {name!r}: a weights file is damaged or incomplete ({e}); "
            "download or copy it again"
        ) from None


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


def write_prompt_marker(folder, prompt: str = DEMO) -> None:
    """Mark a checkpoint folder as trained on ``prompt``'s format (``demo``: the demo's own,
    without the short-answer instruction): ``dop_prompt.json``, written by
    ``scripts/train_demo.py``'s export and read by :func:`prompt_format_of`."""

    write_json_atomic(Path(str(folder)) / PROMPT_MARKER, {"format": PROMPT_FORMAT, "prompt": prompt})


def prompt_format_of(path) -> str | None:
    """The prompt format a checkpoint folder declares (``demo``), or None (the chat template).

    The declaration is ``dop_prompt.json`` (:func:`write_prompt_marker`). Exports made before
    it existed are recognised by their ``training.json``, whose ``command`` names
    ``scripts/train_demo.py``; nothing else is read from that file."""
    folder = Path(str(path))
    marker = _read_json(folder / PROMPT_MARKER)
    if isinstance(marker, dict) and marker.get("format") == PROMPT_FORMAT:
        prompt = marker.get("prompt")
        return prompt if prompt == DEMO else None
    legacy = _read_json(folder / "training.json")  # exports from before the marker
    command = legacy.get("command", "") if isinstance(legacy, dict) else ""
    return DEMO if isinstance(command, str) and "train_demo.py" in command else None


def _read_json(path: Path, limit: int = 1 << 20):
    """A small JSON file's content, or None when it is missing, too big or not JSON."""
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_demo_export(path) -> bool:
    """Whether ``path`` is a folder exported by ``scripts/train_demo.py`` (a retrained demo
    model): such a model was trained on the demo's prompt, without the short-answer
    instruction real checkpoints get, and answers garbage with the other."""
    return prompt_format_of(path) == DEMO


def prompt_builder_for(name_or_path: str) -> PromptBuilder:
    """The prompt builder to use with the model loaded from ``name_or_path``: the demo's
    own format for ``demo``, ``demo-base`` and a folder that declares it (``dop_prompt.json``,
    written by ``scripts/train_demo.py``'s export), :func:`chat_prompt` otherwise."""
    if bundled_dir(name_or_path) is not None or is_demo_export(name_or_path):
        return demo.build_prompt
    return chat_prompt


def prompt_builder_for_model(model) -> PromptBuilder:
    """The prompt builder for a loaded model: the demo's own format when the model was loaded
    from the bundled demo folder or a ``scripts/train_demo.py`` export, the chat template
    otherwise (what :func:`prompt_builder_for` picks from the name)."""

    source = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    bundled = {os.path.abspath(demo.demo_dir(n)) for n in demo.DEMOS}
    if source and (os.path.abspath(source) in bundled or is_demo_export(source)):
        return prompt_builder_for(DEMO)
    return chat_prompt


def num_decoder_layers(model) -> int:
    """Decoder layer count of a loaded model, through its family's adapter."""

    return int(get_adapter(model).num_layers)
