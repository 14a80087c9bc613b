import os

import pytest

from cllm import fileio
from cllm.fileio import (atomic_write_bytes, atomic_write_text, atomic_writer,
                         remove_stale_temporaries)


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "first ✓")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_error_midway_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_new_file_gets_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "f", b"x")
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".model.cllm.0123456789ab.tmp").write_bytes(b"partial")
    for keep in ("model.cllm", ".hidden", ".x.0123.tmp", "notes.tmp"):
        (tmp_path / keep).write_bytes(b"")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".model.cllm.0123456789ab.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", ".x.0123.tmp", "model.cllm", "notes.tmp"]
