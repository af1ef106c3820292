"""Lets PyPI's torchvision import beside the CPU build of torch (test environments only).

PyPI's torchvision wheel is built against CUDA torch: its compiled ops (``_C.so``) do not load
beside torch's CPU build, torchvision then runs without them (``extension._has_ops()`` is
False), except that it registers fake kernels for two of those ops, ``torchvision::nms`` and
``torchvision::qnms``, without checking that they exist, and that import fails. vLLM's LLaVA
path imports torchvision's Python transforms only (through transformers' Pixtral processor),
never its compiled ops. This module, installed into the environment's site-packages with a
``.pth`` line that imports it, waits for the first ``import torchvision`` and declares those
two operators' schemas (no kernel) just before, so the import succeeds; a call of them still
fails as without the shim. ``scripts/install_vllm_env.sh`` installs it; docs/serving.md,
"Installation".
"""

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _DeclareOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch  # only now: every other program in the environment starts without it

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            if not torch._C._dispatch_has_kernel(f"torchvision::{schema.split('(')[0]}"):
                try:
                    lib.define(schema)
                except RuntimeError:  # already declared (the real ops loaded after all)
                    pass
        sys.modules[__name__]._library = lib  # kept alive: a dropped Library removes its ops
        return None  # the normal finders import torchvision itself


if not any(isinstance(f, _DeclareOps) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeclareOps())
