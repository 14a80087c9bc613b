"""The .cllm file: a safetensors file holding a model's float32 parameters under their
ModelConfig names, with string metadata:

    format          "cllm"
    format_version  "1"
    config          the ModelConfig as JSON
    tokenizer       the tokenizer as `tokenizers` JSON (absent for a model without one)
    training        JSON object from the trainer: step, RNG state, data position, run args
                    (training checkpoints only)

A training checkpoint also holds the AdamW moments as tensors `optim.m.<name>` and
`optim.v.<name>`. Any safetensors reader opens these files; this module writes them by
streaming each array to disk (no whole-file copy in memory) and reads them by mapping the file,
so loading a model costs no copy of its weights.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .fileio import atomic_writer

FORMAT = "cllm"
FORMAT_VERSION = "1"
MOMENTS = ("m", "v")
_HEADER_LENGTH = struct.Struct("<Q")
# The safetensors library refuses headers above 100 MB; a larger length means a foreign file.
_MAX_HEADER_BYTES = 100_000_000
_FLOAT32 = np.dtype("<f4")
_CHECKPOINT_NAME = re.compile(r"checkpoint_step_(\d+)\.cllm")


@dataclass
class CllmFile:
    config: ModelConfig
    params: dict[str, np.ndarray]
    # The parameters as one array in ModelConfig.layout() order, when the file stores them
    # back to back in that order (save_cllm does), else None.
    flat: np.ndarray | None
    tokenizer_json: str | None
    optimizer: dict[str, dict[str, np.ndarray]] | None
    training: dict | None


def save_cllm(path: str | os.PathLike, params: dict[str, np.ndarray], config: ModelConfig,
              tokenizer_json: str | None,
              optimizer: dict[str, dict[str, np.ndarray]] | None = None,
              training: dict | None = None) -> None:
    """Write a .cllm file atomically. `optimizer` maps "m" and "v" to arrays named like
    `params`; `training` is any JSON-able dict. Shapes are checked against `config`."""
    tensors = dict(params)
    if optimizer is not None:
        for moment in MOMENTS:
            tensors.update({f"optim.{moment}.{name}": array
                            for name, array in optimizer[moment].items()})
    _check_tensors(path, {name: array.shape for name, array in tensors.items()}, config)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json()}
    if tokenizer_json is not None:
        metadata["tokenizer"] = tokenizer_json
    if training is not None:
        metadata["training"] = json.dumps(training)

    arrays = [(name, np.ascontiguousarray(array, dtype=_FLOAT32))
              for name, array in tensors.items()]
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, array in arrays:
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces (as the safetensors library does) so that tensor data starts 8-aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_writer(path) as f:
        f.write(_HEADER_LENGTH.pack(len(header_bytes)))
        f.write(header_bytes)
        for _, array in arrays:
            f.write(array.data)


def load_cllm(path: str | os.PathLike, mmap: bool = True) -> CllmFile:
    """Read and fully validate a .cllm file. With `mmap`, the arrays are read-only views of
    the mapped file; without, they are writable arrays over one in-memory copy of it."""
    path = Path(path)
    buffer = _read(path, mmap)
    header, data_start = _parse_header(path, buffer)
    metadata = header.pop("__metadata__", None)
    config, tokenizer_json, training = _parse_metadata(path, metadata)
    spans = {name: _tensor_span(path, name, info) for name, info in header.items()}
    _check_spans_fill_data(path, spans, len(buffer) - data_start)
    _check_tensors(path, {name: shape for name, (shape, _) in spans.items()}, config)

    tensors = {name: np.frombuffer(buffer, dtype=_FLOAT32, count=math.prod(shape),
                                   offset=data_start + begin).reshape(shape)
               for name, (shape, begin) in spans.items()}
    params = {name: tensors[name] for name, _ in config.tensor_shapes()}
    flat = None
    layout, size = config.layout()
    first = spans[next(iter(layout))][1]
    if all(spans[name][1] - first == 4 * offset for name, (offset, _) in layout.items()):
        flat = np.frombuffer(buffer, dtype=_FLOAT32, count=size, offset=data_start + first)
    optimizer = None
    if len(tensors) > len(params):
        optimizer = {moment: {name: tensors[f"optim.{moment}.{name}"] for name in params}
                     for moment in MOMENTS}
    return CllmFile(config, params, flat, tokenizer_json, optimizer, training)


def _read(path: Path, use_mmap: bool) -> mmap.mmap | bytearray:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER_LENGTH.size:
                raise CheckpointError(f"{path}: truncated ({size} bytes, too short for the "
                                      f"header of a .cllm file)")
            if use_mmap:
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return bytearray(f.read())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from e


def _parse_header(path: Path, buffer) -> tuple[dict, int]:
    """The safetensors JSON header and the offset where tensor data starts."""
    (length,) = _HEADER_LENGTH.unpack_from(buffer)
    if not 2 <= length <= _MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: not a .cllm file (its first 8 bytes give an "
                              f"implausible header length, {length})")
    data_start = _HEADER_LENGTH.size + length
    if data_start > len(buffer):
        raise CheckpointError(f"{path}: truncated (the header needs {data_start} bytes but the "
                              f"file has {len(buffer)})")
    try:
        header = json.loads(bytes(buffer[_HEADER_LENGTH.size:data_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a .cllm file, or a damaged one (its header is "
                              f"not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a .cllm file (its header is not a JSON object)")
    return header, data_start


def _parse_metadata(path: Path, metadata) -> tuple[ModelConfig, str | None, dict | None]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a .cllm file (a safetensors file without cllm "
                              f"metadata)")
    if not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointError(f"{path}: damaged .cllm file (metadata values must be strings)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: .cllm format version {version!r} is not supported "
                              f"(this cllm reads version {FORMAT_VERSION})")
    try:
        config = ModelConfig.from_dict(_json_object(metadata.get("config")))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model configuration: {e}") from e
    training = None
    if "training" in metadata:
        try:
            training = _json_object(metadata["training"])
        except ValueError as e:
            raise CheckpointError(f"{path}: invalid training state: {e}") from e
    return config, metadata.get("tokenizer"), training


def _json_object(text: str | None) -> dict:
    if text is None:
        raise ValueError("it is missing")
    value = json.loads(text)  # JSONDecodeError is a ValueError
    if not isinstance(value, dict):
        raise ValueError("it is not a JSON object")
    return value


def _tensor_span(path: Path, name: str, info) -> tuple[tuple[int, ...], int]:
    """A tensor's shape and the offset of its data, after checking its header entry."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: damaged .cllm file (header entry of tensor {name} is "
                              f"not a safetensors tensor description)")
    if info["dtype"] != "F32":
        raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']!r} but .cllm "
                              f"files hold float32 (F32) tensors")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (_is_index_list(shape) and _is_index_list(offsets) and len(offsets) == 2
            and offsets[1] - offsets[0] == math.prod(shape) * _FLOAT32.itemsize):
        raise CheckpointError(f"{path}: damaged .cllm file (shape {shape} and byte range "
                              f"{offsets} of tensor {name} do not agree)")
    return tuple(shape), offsets[0]


def _is_index_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_spans_fill_data(path: Path, spans: dict, data_bytes: int) -> None:
    """Tensor data must tile the rest of the file exactly, as the safetensors format requires."""
    end = 0
    for shape, begin in sorted(spans.values(), key=lambda span: span[1]):
        if begin != end:
            raise CheckpointError(f"{path}: damaged .cllm file (tensor data overlaps or has "
                                  f"gaps at byte {end})")
        end = begin + math.prod(shape) * _FLOAT32.itemsize
    if end > data_bytes:
        raise CheckpointError(f"{path}: truncated (the header describes {end} bytes of tensor "
                              f"data but only {data_bytes} follow it)")
    if end < data_bytes:
        raise CheckpointError(f"{path}: damaged .cllm file ({data_bytes - end} unexpected "
                              f"bytes after the tensor data)")


def _check_tensors(path, shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> None:
    """Exactly the configuration's tensors with its shapes, plus either all optimizer moments
    or none of them."""
    expected = dict(config.tensor_shapes())
    if any(name.startswith("optim.") for name in shapes):
        expected.update({f"optim.{moment}.{name}": shape
                         for moment in MOMENTS for name, shape in config.tensor_shapes()})
    for name in shapes:
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name} (not part of the model "
                                  f"configuration)")
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(shapes[name])} but "
                                  f"the configuration needs {shape}")


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"checkpoint_step_{step}.cllm"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint_step_N.cllm in `folder`, highest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0], reverse=True)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints; return the deleted paths."""
    if keep < 0:
        raise ValueError(f"keep must be at least 0, got {keep}")
    doomed = [path for _, path in list_checkpoints(folder)[keep:]]
    for path in doomed:
        path.unlink()
    return doomed
