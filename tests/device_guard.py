"""A guard that fails when dop's own code makes a tensor without saying on which device.

On a GPU, a tensor made on the default device (the CPU) and mixed with the model's tensors
fails or silently copies; on CPU nothing shows. Under :class:`DeviceGuard`, every tensor
factory called from a module of the ``dop`` package without an explicit ``device=`` raises.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import dop

FACTORIES = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.eye,
    torch.linspace, torch.randperm, torch.rand, torch.randn, torch.randint,
}
DOP_ROOT = os.path.dirname(os.path.abspath(dop.__file__)) + os.sep


class DeviceGuard(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            while caller is not None and "torch" + os.sep in caller.f_code.co_filename and DOP_ROOT not in caller.f_code.co_filename:
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith(DOP_ROOT):
                where = f"{os.path.relpath(caller.f_code.co_filename, DOP_ROOT)}:{caller.f_lineno}"
                raise AssertionError(f"dop made a tensor with torch.{func.__name__} and no device= at {where}")
        if func in FACTORIES:
            self.checked += 1
        return func(*args, **kwargs)
