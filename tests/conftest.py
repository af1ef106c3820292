import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/ holds the shared helpers (reference.py, tiny_models.py, ...), and the tests are grouped
# in one folder per package of src/dop; a family's tests reuse checks written once in another
# package's tests (test_runtime's reference comparison, test_flops' counters), so every folder
# is importable
sys.path.insert(0, HERE)
for _name in sorted(os.listdir(HERE)):
    _folder = os.path.join(HERE, _name)
    if os.path.isdir(_folder) and any(f.startswith("test_") for f in os.listdir(_folder)):
        sys.path.insert(1, _folder)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the tiny models run faster on one thread than on
    two on this shared 2-core machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
