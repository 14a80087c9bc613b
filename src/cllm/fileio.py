"""Atomic file writes: a reader sees either the old file or the complete new one, never a part."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator


_TEMP_HEX_DIGITS = 12
_TEMPORARY_NAME = re.compile(rf"\..+\.[0-9a-f]{{{_TEMP_HEX_DIGITS}}}\.tmp")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` only once the block completes without error.

    The data goes to a hidden temporary file in the same folder (so the final rename cannot cross
    file systems), is flushed and fsynced, then renamed over `path`; the folder is fsynced so the
    rename itself survives a power cut. On any error the temporary file is removed and an existing
    file at `path` is left untouched.
    """
    path = Path(path)
    folder = path.parent
    temp = folder / f".{path.name}.{secrets.token_hex(_TEMP_HEX_DIGITS // 2)}.tmp"
    # O_EXCL: never clobber a file of the same name; 0o666 lets the umask decide permissions,
    # as for any ordinarily created file (tempfile.mkstemp would force 0o600).
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        _raise_naming(e, path, temp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        _raise_naming(e, path, temp)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _raise_naming(error: OSError, path: Path, temp: Path):
    """Raise the error of writing `path`, naming it: a write, flush or fsync that fails (a full
    disk, a quota) raises an OSError without a file name, and one about the temporary file
    names a file the user never asked for. Errors naming another file are raised as they are."""
    if error.filename not in (None, str(temp), temp) or error.errno is None:
        raise error
    # OSError(errno, ...) is the subclass of that errno (PermissionError for EACCES, ...)
    raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems (and platforms) refuse fsync on a directory; the rename has still
        # happened, it is only its durability across a power cut that is not guaranteed there.
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (kill -9, power cut) left in
    `folder`; return their paths. Only for a folder no other process is writing to."""
    stale = [entry for entry in Path(folder).iterdir()
             if _TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
