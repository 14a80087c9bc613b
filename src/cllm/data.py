"""The first phases of training: find the corpus, encode it once into dataset.bin, and draw
training windows from the token stream.

dataset.bin layout (little-endian):
    bytes  0-7   magic b"CLLMDATA"
    bytes  8-11  format version, uint32 (1)
    bytes 12-15  bytes per token id, uint32: 2 (uint16, vocabularies up to 65536) or 4 (uint32)
    bytes 16-19  vocabulary size of the tokenizer that wrote it, uint32
    bytes 20-23  zero padding, so the count and the ids after it are 8-byte aligned
    bytes 24-31  token count, uint64
    bytes 32-    the token ids

Document boundaries: every file is encoded on its own (no token spans two files) and every
non-empty file is made to end with a newline, one being added where it lacks one, as when
text files are concatenated with `cat`. The tokenizer is trained on the same texts
(`iter_texts`), so a character vocabulary always holds the newline.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import DataError
from .fileio import atomic_writer
from .tokenizer import encode_batch, split_for_encoding

MAGIC = b"CLLMDATA"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIII4xQ")
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}

_READ_BLOCK = 1 << 20
# Pieces encoded per call: encode_batch spreads them over the CPU cores, and the ids of a batch
# (a few MB of text) are all that is held in memory at once.
_ENCODE_BATCH = 8


@dataclass(frozen=True)
class CorpusFiles:
    root: Path
    paths: list[Path]
    skipped: int
    total_bytes: int


def find_text_files(root: str | os.PathLike) -> CorpusFiles:
    """Every regular file under `root` that is UTF-8 text, sorted by relative path.

    Symlinked files are read; symlinked folders are not entered (they could loop or pull in a
    whole other tree). A file is text if it decodes as strict UTF-8 and holds no NUL byte.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such corpus folder")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder (give the folder that holds the text files)")
    candidates = _regular_files(root)
    if not candidates:
        raise DataError(f"{root}: the corpus folder holds no files")
    paths, total_bytes = [], 0
    for path in candidates:
        size = _text_size(path)
        if size is not None:
            paths.append(path)
            total_bytes += size
    skipped = len(candidates) - len(paths)
    if not paths:
        raise DataError(f"{root}: none of its {skipped} files is UTF-8 text "
                        f"(all {skipped} were skipped as binary or not UTF-8)")
    return CorpusFiles(root, paths, skipped, total_bytes)


def _regular_files(root: Path) -> list[Path]:
    found, folders = [], [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(Path(entry.path))
                    elif entry.is_file():
                        found.append(Path(entry.path))
        except OSError as e:
            raise DataError(f"{folder}: cannot list the folder: {e.strerror}") from e
    found.sort(key=lambda path: path.relative_to(root).as_posix())
    return found


def _text_size(path: Path) -> int | None:
    """The file's size in bytes if it is UTF-8 text without NUL bytes, else None.
    Reads in blocks so that a large binary file is never held in memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                if b"\0" in block:
                    return None
                decoder.decode(block)
                size += len(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    return size


def iter_texts(files: CorpusFiles) -> Iterator[str]:
    """Each file's text as it enters the dataset (ending with a newline), one file in memory."""
    for path in files.paths:
        yield _with_final_newline(_read_text(path))


def _read_text(path: Path) -> str:
    try:
        # Bytes then decode, not read_text: universal newlines would turn \r\n into \n.
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is no longer UTF-8 text (did it change while cllm ran?)") from e


def _with_final_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def build_dataset(tokenizer: Tokenizer, files: CorpusFiles, path: str | os.PathLike,
                  progress: Callable[[int], object] | None = None) -> int:
    """Encode the corpus once into the dataset file at `path`; return the token count.

    Streams file by file, so at most one file's text and a batch of its ids are in memory.
    `progress`, if given, is called with the number of corpus bytes just encoded (so a tqdm
    bar's `update` fits, with total=files.total_bytes).
    """
    vocab_size = tokenizer.get_vocab_size()
    itemsize = 2 if vocab_size <= 1 << 16 else 4
    dtype = _DTYPES[itemsize]
    count = 0
    with atomic_writer(path) as out:
        out.write(_HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, vocab_size, 0))
        for file_path in files.paths:
            pieces = split_for_encoding(_read_text(file_path))
            # Sizes of the pieces as they are on disk, before the final newline is added.
            sizes = [len(piece.encode("utf-8")) for piece in pieces]
            pieces[-1] = _with_final_newline(pieces[-1])
            for i in range(0, len(pieces), _ENCODE_BATCH):
                for ids in encode_batch(tokenizer, pieces[i:i + _ENCODE_BATCH], str(file_path)):
                    out.write(ids.astype(dtype).data)
                    count += len(ids)
                if progress is not None:
                    progress(sum(sizes[i:i + _ENCODE_BATCH]))
        if count == 0:
            raise DataError(f"{files.root}: the corpus holds no text "
                            f"(all {len(files.paths)} text files are empty)")
        out.seek(0)
        out.write(_HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, vocab_size, count))
    return count


def corpus_record(files: CorpusFiles, dataset: str | os.PathLike) -> dict:
    """What a dataset was built from: each file's path under the root and its size, and the
    digest of the dataset file (every id): a resumed run checks its data against this."""
    digest = hashlib.sha256()
    with open(dataset, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"files": [[str(path.relative_to(files.root)), path.stat().st_size]
                      for path in files.paths],
            "dataset_sha256": digest.hexdigest()}


def corpus_change(old: dict, new: dict) -> str | None:
    """What differs between two corpus records, in words; None if nothing does."""
    before, after = dict(map(tuple, old["files"])), dict(map(tuple, new["files"]))
    changes = [(what, sorted(names)) for what, names in (
        ("added", set(after) - set(before)), ("removed", set(before) - set(after)),
        ("changed in size", {p for p in set(before) & set(after) if before[p] != after[p]}))
        if names]
    described = [f"{len(names)} file{'s' * (len(names) > 1)} {what} ({', '.join(names[:3])}"
                 f"{', ...' if len(names) > 3 else ''})" for what, names in changes]
    if not described and old["dataset_sha256"] != new["dataset_sha256"]:
        described.append("the same files with other contents")
    return "; ".join(described) or None


def open_dataset(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Map the token ids of a dataset file read-only, after checking its header.

    With `vocab_size`, also check that the file was written for a vocabulary of that size:
    ids from another tokenizer would silently index the wrong (or no) embedding rows.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such dataset file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    if len(header) < len(MAGIC) or header[:len(MAGIC)] != MAGIC:
        raise DataError(f"{path}: not a cllm dataset file (it does not start with {MAGIC!r})")
    if len(header) < _HEADER.size:
        raise DataError(f"{path}: truncated dataset file ({size} bytes, shorter than its header)")
    _, version, itemsize, stored_vocab, count = _HEADER.unpack(header)
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: dataset format version {version} is not supported "
                        f"(this cllm reads version {FORMAT_VERSION}); delete it to rebuild it")
    if itemsize not in _DTYPES:
        raise DataError(f"{path}: corrupt dataset header (token size {itemsize} bytes)")
    expected = _HEADER.size + count * itemsize
    if size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise DataError(f"{path}: {state} dataset file: its header promises {count} tokens "
                        f"({expected} bytes) but the file has {size} bytes")
    if count == 0:
        raise DataError(f"{path}: the dataset holds no tokens")
    if vocab_size is not None and stored_vocab != vocab_size:
        raise DataError(f"{path}: the dataset was encoded for a vocabulary of {stored_vocab} "
                        f"tokens but the tokenizer has {vocab_size}; delete it to rebuild it")
    return np.memmap(path, dtype=_DTYPES[itemsize], mode="r", offset=_HEADER.size,
                     shape=(count,))


def split_train_val(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `int(len * val_fraction)` tokens are the validation split; both are views."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be at least 0 and below 1, "
                        f"got {val_fraction}")
    n_train = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:n_train], tokens[n_train:]


def sample_windows(rng: np.random.Generator, tokens: np.ndarray, batch: int, seq_len: int,
                   name: str = "corpus") -> tuple[np.ndarray, np.ndarray]:
    """`batch` windows at uniformly random starts: inputs x and next-token targets y,
    both C-contiguous int64 arrays of shape (batch, seq_len). `name` says in errors which
    token stream is too short (the corpus, its validation split...)."""
    _require_one_window(tokens, seq_len, name)
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    index = starts[:, None] + np.arange(seq_len)
    return tokens[index].astype(np.int64), tokens[index + 1].astype(np.int64)


def iter_windows_sequential(tokens: np.ndarray, batch: int, seq_len: int,
                            name: str = "corpus") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive non-overlapping windows covering the split, `batch` at a time (the last
    batch may be smaller), for evaluating on every token rather than a random sample."""
    _require_one_window(tokens, seq_len, name)
    n_windows = (len(tokens) - 1) // seq_len
    for first in range(0, n_windows, batch):
        last = min(first + batch, n_windows)
        x = tokens[first * seq_len:last * seq_len]
        y = tokens[first * seq_len + 1:last * seq_len + 1]
        # np.array, not astype: a plain ndarray rather than an in-memory np.memmap.
        yield (np.array(x.reshape(-1, seq_len), dtype=np.int64),
               np.array(y.reshape(-1, seq_len), dtype=np.int64))


def _require_one_window(tokens: np.ndarray, seq_len: int, name: str) -> None:
    # One window needs seq_len inputs plus the target that follows the last of them.
    if len(tokens) < seq_len + 1:
        raise DataError(f"{name} too short for one sequence of {seq_len} tokens: it has "
                        f"{len(tokens)} tokens and needs at least {seq_len + 1}")
