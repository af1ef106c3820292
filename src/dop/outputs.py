"""Output files of the commands: checked before any work, locked while written, and kept
somewhere safe when the target cannot be written at the end (issue 16).

- :func:`check_output_file` / :func:`check_output_dir`: the target is not a folder (a file),
  its folder exists and this user may create files there. Every command that writes calls
  them before it loads a model or reads data.
- :func:`output_lock`: an exclusive advisory lock (``fcntl.flock``) on ``.<name>.lock`` beside
  the target, so two processes writing the same output never silently lose one result: the
  second is refused with a message naming the first. The kernel drops the lock when its
  holder dies, so a killed run (even ``kill -9``) never leaves a stale lock behind.
- :func:`write_or_rescue`: write a finished result; if the target fails after the work was
  done, write it to a rescue file in the temporary folder and say where.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import distributed

try:  # POSIX only; importing dop works without it, and only output_lock then fails
    import fcntl
except ImportError:
    fcntl = None


class OutputLockedError(RuntimeError):
    """Another process is writing the same output."""


def _writable_folder(flag: str, path: str, folder: str) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path!r}: folder {folder!r} is not writable by this user")
    try:  # os.access does not see read-only mounts or ACLs: create and remove a probe file
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dop-probe-")
    except OSError as e:
        raise PermissionError(f"{flag} {path!r}: cannot create files in {folder!r} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """``path`` can be written as a file: not a folder, its folder exists and is writable,
    and an existing file there is writable."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{flag}: give a file name")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; give a file name")
    _writable_folder(flag, path, os.path.dirname(os.path.abspath(path)))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"{flag} {path!r}: the file exists and is not writable by this user")


def check_output_dir(flag: str, path: str | os.PathLike, *, must_be_empty: bool = False) -> None:
    """``path`` can be used as an output folder: an existing writable folder (empty when
    ``must_be_empty``), or a new one whose nearest existing parent is writable."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{flag}: give a folder name")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file; give a folder")
    if os.path.isdir(path):
        if must_be_empty and os.listdir(path):
            raise ValueError(f"{flag} {path!r} is not empty; give a new or empty folder")
        _writable_folder(flag, path, path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path!r}: {parent!r} is a file, not a folder")
    _writable_folder(flag, path, parent)


def lock_path(target: str | os.PathLike) -> str:
    """The lock file of ``target``: ``<target>/.dop.lock`` for a folder, else ``.<name>.lock``
    beside the file."""
    target = os.path.abspath(os.fspath(target))
    if os.path.isdir(target):
        return os.path.join(target, ".dop.lock")
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _acquire(path: str, target: str) -> int:
    if fcntl is None:
        raise OSError(f"cannot lock {target}: file locks need fcntl, which this system lacks (POSIX only)")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (process {holder})" if holder else ""
                raise OutputLockedError(
                    f"another dop process{who} is writing {target} (lock {path}); "
                    "wait for it to finish or choose another output"
                ) from None
            raise
        # the holder before us may have removed the file between our open and our lock:
        # then we hold a lock on a deleted file; start again on the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(targets: Sequence[str | os.PathLike | None]) -> Iterator[None]:
    """Hold an exclusive lock on every target (files or folders; ``None`` skipped) for the
    block; raises :class:`OutputLockedError` at once when another process holds one.

    Under several torch.distributed ranks only rank 0 locks: it alone writes the outputs
    (docs/scaling.md), and the ranks of one job must not refuse each other."""
    if not distributed.is_main():
        yield
        return
    paths = {lock_path(t): os.fspath(t) for t in targets if t}
    held: list[tuple[str, int]] = []
    try:
        for p in sorted(paths):
            held.append((p, _acquire(p, paths[p])))
        yield
    finally:
        for p, fd in reversed(held):
            with contextlib.suppress(OSError):
                os.unlink(p)
            os.close(fd)


def rescue_path(target: str | os.PathLike) -> str:
    name = os.path.basename(os.path.abspath(os.fspath(target))) or "output"
    return os.path.join(tempfile.gettempdir(), f"dop-rescued-{os.getpid()}-{name}")


def write_or_rescue(flag: str, target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(target)``; if that fails with an OSError, ``write`` to a rescue file in the
    temporary folder and raise an OSError that says where the finished result is."""
    target = os.fspath(target)
    try:
        write(target)
    except OSError as e:
        rescue = rescue_path(target)
        try:
            write(rescue)
        except OSError:
            raise OSError(f"{flag} {target!r}: cannot write ({e.strerror or e}); the result is lost") from None
        raise OSError(
            f"{flag} {target!r}: cannot write ({e.strerror or e}); the finished result is saved in {rescue}"
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def user_file_mode() -> int:
    """The mode a new file gets under this process's umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def user_dir_mode() -> int:
    """The mode a new folder gets under this process's umask (0o755 under umask 022)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def folder_written_whole(out_dir: str | os.PathLike) -> Iterator:
    """Yield a temporary folder beside ``out_dir`` (mode from the user's umask); when the block
    ends, rename it to ``out_dir``, so a folder is never seen half-written; on an error, remove
    it. ``out_dir`` must not exist or be an empty folder (ValueError otherwise)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, user_dir_mode())  # mkdtemp makes 0700; outputs follow the umask like mkdir
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
