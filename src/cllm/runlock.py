"""One run per checkpoint folder: `cllm train` holds an fcntl lock on a file in the folder for
its whole run. A second run on the folder fails at once with the first one's PID; the kernel
releases the lock of a process that dies, however it dies, so a stale lock is simply taken.
The file is removed when the run ends."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import CllmError

LOCK_FILE = ".cllm-train.lock"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    path = folder / LOCK_FILE
    fd = _locked(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        path.unlink(missing_ok=True)   # before the lock goes: see _locked
        os.close(fd)


def _locked(path: Path, folder: Path) -> int:
    """A descriptor of the lock file, locked. A run that ends removes the file while it still
    holds the lock; one that opened the old file just before may lock it after, and must then
    try again on the file now at `path`."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise CllmError(f"{path}: cannot create the run's lock file: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CllmError(f"{folder} is in use by another cllm train (PID {holder}): wait "
                            f"for it to end, or give another folder with -c") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
