"""lmms-eval integration (docs/eval.md, "lmms-eval"): the model ``dop``, registered through
lmms-eval's entry-point group ``lmms_eval.models`` (see ``pyproject.toml``), and the task
folder ``tasks/shapes_test`` for the synthetic benchmark.

Importing this package does not import lmms-eval; :func:`manifests` does, when lmms-eval
loads its entry points.
"""

from __future__ import annotations

from pathlib import Path

MODEL_ID = "dop"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifests():
    """The entry point's payload: lmms-eval's ``ModelManifest`` for the ``dop`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest  # heavy: optional, only with lmms-eval installed

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="dop.lmms.model.DopLMM")]
