"""One run per run folder: an exclusive lock on output_dir/.<run_name>.lock while a run writes the folder.

The lock is an flock on an open file, so the kernel drops it when the process ends however it ends
(kill -9 included): a stale lock file never blocks a later run. The file holds the owner's pid and
start time, for the message the second run prints. It sits beside the run folder, not in it, so a
resume that is refused leaves the run folder exactly as it was.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_SUFFIX = ".lock"
MAX_NAME_SUFFIX = 1000  # run-YYYYmmdd-HHMMSS-2 ... : runs started in the same second

_held: dict[Path, int] = {}  # run folder -> the open lock file's descriptor, for this process's lifetime


class RunLockError(ValueError):
    """The run folder is being written by another live process."""


def lock_run_dir(output_dir: str | os.PathLike, run_name: str, unique_name: bool = False) -> str:
    """Lock output_dir/run_name for this process and return the run name it holds.

    unique_name (a name the config made, not the user): when that folder exists already, the first
    free run_name-2, run_name-3, ... is taken instead, created atomically, so two runs started in the
    same second never share a folder. A folder locked by another process raises RunLockError naming it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = run_name
    if unique_name:
        for n in range(1, MAX_NAME_SUFFIX + 1):
            name = run_name if n == 1 else f"{run_name}-{n}"
            try:
                (output_dir / name).mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise RunLockError(f"{output_dir} already holds {MAX_NAME_SUFFIX} runs named {run_name}*: set run_name")
    run_dir = output_dir / name
    key = run_dir.resolve()
    if key in _held:  # this process holds it already (a second train() in one process, as the tests run)
        return name
    fd = os.open(lock_file(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "a process that has not written its pid"
        os.close(fd)
        raise RunLockError(f"{run_dir} is being written by another run ({owner}): wait for it to finish or stop it, "
                           f"or choose another run_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[key] = fd
    return name


def lock_file(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}{LOCK_SUFFIX}"


def unlock_run_dir(run_dir: str | os.PathLike) -> None:
    """Release this process's lock on run_dir (a process that ends releases it anyway)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)
