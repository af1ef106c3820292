"""Several processes, one job: `torchrun ... -m dop search|eval|run` (issue 14, docs/scaling.md).

PyTorch's launcher and collectives are the engine; this module is the little glue the
commands need. ``torchrun`` (one or several nodes) describes the job in the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``);
:func:`init_from_env` joins that process group when ``WORLD_SIZE`` > 1. The work is then
split by *sample*: rank r of W takes samples r, r+W, r+2W, ... (:func:`shard`), and the
per-sample results are gathered back into sample order on every rank
(:func:`gather_ordered`), so every figure computed from them is the one a single process
computes. Only small Python objects travel (``all_gather_object`` over gloo, on CPU even
when the models run on GPUs), so the collectives cost nothing next to the model.

Until :func:`init_from_env` has joined a job of more than one rank, every helper is the
identity (``shard`` gives every index, ``gather_ordered`` the local values in order): one
process behaves exactly as before. The library functions (``search``, ``build_table``,
``evaluate``) then shard themselves; a script of one's own under torchrun calls
``dop.distributed.init_from_env()`` first, as the ``dop`` command does. A process group made
by someone else (accelerate, a training loop) is not used unless that call is made, so code
that hands each rank its own data keeps working.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

from . import compat

T = TypeVar("T")

# A rank that finishes its share waits at the next gather for the slowest one (a resumed
# job can leave one rank most of the work), so the wait limit is generous.
TIMEOUT = timedelta(hours=2)

_owned = False  # the process group was created by init_from_env (and is destroyed by shutdown)
_active = False  # init_from_env joined a job of several ranks: the library shares its work


def _dist():
    import torch.distributed as dist  # heavy: torch, only once a job of several ranks is asked about

    return dist


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_from_env() -> bool:
    """Join the process group torchrun describes, when ``WORLD_SIZE`` > 1; return whether
    this process is now one of several. Idempotent. Object collectives go over gloo; with
    CUDA the group also has NCCL for tensors, and this rank's GPU is ``cuda:LOCAL_RANK``."""
    global _owned, _active
    if env_world_size() <= 1:
        return False
    import torch  # heavy: only under torchrun, so that one process (and `dop --help`) never loads it here

    dist = _dist()
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=TIMEOUT)
        _owned = True
    _active = dist.get_world_size() > 1
    return _active


def shutdown() -> None:
    """Stop sharing, and leave the process group made by :func:`init_from_env` (if it made one)."""
    global _owned, _active
    _active = False
    if _owned:
        dist = _dist()
        if dist.is_initialized():
            dist.destroy_process_group()
        _owned = False


def is_distributed() -> bool:
    """:func:`init_from_env` joined a job of more than one rank (and it is still on)."""
    if not _active:
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes outputs and prints summaries."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def device_for(requested: str | None = None) -> torch.device:
    """This rank's device: ``requested`` if given, else CUDA when available, else the CPU;
    a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    import torch  # heavy: the module stays light for the cli, which imports it to join and leave a job

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None and is_distributed():
        dev = torch.device("cuda", local_rank())
    return dev


def shard(n: int) -> list[int]:
    """This rank's share of ``range(n)``: every ``world_size()``-th index from ``rank()``."""
    return list(range(rank(), n, world_size()))


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather_ordered(local: dict[int, T], n: int) -> list[T]:
    """The values of indices ``0..n-1`` from the ranks that hold them (``local`` maps this
    rank's indices to its values), in index order, on every rank."""
    merged: dict[int, T] = {}
    for part in all_gather(local):
        merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"gather_ordered: no rank returned indices {missing[:5]}")
    return [merged[i] for i in range(n)]


class JobProgress:
    """A progress bar of the whole job, drawn on rank 0 only: each rank adds what it
    finishes to a counter in the process group's key-value store. In one process, a plain
    tqdm bar. ``wait(target)`` (rank 0) keeps drawing until the job-wide count of this
    bar's new steps reaches ``target``, i.e. until the other ranks have finished too."""

    _made = 0  # bars made in this process; every rank makes the same bars in the same order

    def __init__(self, total: int, initial: int = 0, *, desc: str, unit: str, disable: bool = False):
        JobProgress._made += 1
        self.initial = initial
        self.store = None
        if is_distributed() and not disable:
            self.store = _store()
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self.key = f"dop/progress/{restart}/{JobProgress._made}"
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable or not is_main(),
                        file=sys.stderr, leave=False)

    def update(self, k: int = 1) -> None:
        if self.store is None:
            self.bar.update(k)
            return
        done = self.store.add(self.key, k)
        if is_main():
            self._show(done)

    def _show(self, done: int) -> None:
        self.bar.n = self.initial + done
        self.bar.refresh()

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw, refresh=False)

    def wait(self, target: int, poll_s: float = 0.5) -> None:
        if self.store is None or not is_main():
            return
        while (done := self.store.add(self.key, 0)) < target:
            self._show(done)
            time.sleep(poll_s)
        self._show(done)

    def close(self) -> None:
        self.bar.close()


def _store():
    """The process group's key-value store (the rendezvous store under torchrun)."""
    return compat.default_store()
