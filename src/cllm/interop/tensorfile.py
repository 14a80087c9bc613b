"""safetensors files of any origin: read from untrusted sources with every header field checked
before anything is allocated from it, and written as a stream (one tensor in memory at a time,
never the whole file), atomically.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
{"dtype", "shape", "data_offsets"} (offsets relative to the end of the header) and an optional
"__metadata__" object of strings, then the tensor data."""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import safejson
from ..fileio import atomic_writer
from .common import InteropError

_LENGTH = struct.Struct("<Q")
# The safetensors library's own limit on the header.
MAX_HEADER_BYTES = 100_000_000
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
            "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# The dtypes whose values float32 holds exactly or to float32 rounding (F64).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# The numpy dtype that holds each readable dtype's values (BF16: its bits).
NUMPY_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
                "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8"),
                "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
# A uint16 array is BF16 only when the writer says so (it has no U16).
_CODE = {np.dtype(dtype): code for code, dtype in NUMPY_DTYPES.items() if code != "BF16"}


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int      # absolute offset of the data in the file
    nbytes: int


class TensorFile:
    """A safetensors file mapped read-only, its header fully validated. `entries` gives each
    tensor's dtype, shape and place; `float32(name)` reads a floating tensor as float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _LENGTH.size:
                    raise InteropError(f"{self.path}: {size} bytes, too short for a safetensors "
                                       f"file")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise InteropError(f"{self.path}: no such file") from None
        (length,) = _LENGTH.unpack_from(self._map)
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - _LENGTH.size):
            raise InteropError(f"{self.path}: not a safetensors file (its first 8 bytes give "
                               f"a header of {length} bytes in a file of {size})")
        data_start = _LENGTH.size + length
        try:
            header = safejson.loads(bytes(self._map[_LENGTH.size:data_start]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InteropError(f"{self.path}: not a safetensors file (its header is not valid "
                               f"JSON: {e})") from e
        if not isinstance(header, dict):
            raise InteropError(f"{self.path}: not a safetensors file (its header is not a "
                               f"JSON object)")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(v, str) for v in metadata.values())):
            raise InteropError(f"{self.path}: damaged safetensors file (__metadata__ must map "
                               f"names to strings)")
        self.metadata: dict[str, str] = metadata or {}
        self.entries = {name: self._entry(name, info, data_start, size - data_start)
                        for name, info in header.items()}
        end = data_start
        for entry in sorted(self.entries.values(), key=lambda e: e.begin):
            if entry.begin < end:
                raise InteropError(f"{self.path}: damaged safetensors file (tensor data "
                                   f"overlaps at byte {entry.begin})")
            end = entry.begin + entry.nbytes

    def _entry(self, name: str, info, data_start: int, data_bytes: int) -> Entry:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InteropError(f"{where}: its header entry is not a safetensors tensor "
                               f"description")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            raise InteropError(f"{where}: unknown dtype {dtype!r}")
        if not (_index_list(shape) and _index_list(offsets) and len(offsets) == 2):
            raise InteropError(f"{where}: its shape {shape!r} or byte range {offsets!r} is not "
                               f"a list of non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise InteropError(f"{where}: byte range {offsets} lies outside the "
                               f"{data_bytes:,} bytes of data")
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise InteropError(f"{where}: shape {shape} of {dtype} needs "
                               f"{math.prod(shape) * ITEMSIZE[dtype]:,} bytes but its byte "
                               f"range holds {end - begin:,}")
        return Entry(dtype, tuple(shape), data_start + begin, end - begin)

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32: a read-only view of the file for F32, a converted copy for
        F16, BF16 and F64."""
        entry = self.entries[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise InteropError(f"{self.path}: tensor {name!r} holds {entry.dtype}, not "
                               f"floating-point numbers ({', '.join(FLOAT_DTYPES)})")
        raw = np.frombuffer(self._map, dtype=NUMPY_DTYPES[entry.dtype],
                            count=entry.nbytes // ITEMSIZE[entry.dtype],
                            offset=entry.begin).reshape(entry.shape)
        if entry.dtype == "BF16":
            # bfloat16 is the upper half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if entry.dtype == "F32" else raw.astype(np.float32)


def _index_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def safetensors_header(tensors: list[tuple], metadata: dict[str, str] | None = None) -> dict:
    """The header of a safetensors file holding the named arrays back to back, in order. Each
    entry is (name, array), of a dtype that says its code, or (name, array, code): ("BF16",
    bfloat16 bits as uint16)."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, array, *code in tensors:
        header[name] = {"dtype": _dtype_code(name, array, *code), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    return header


def _dtype_code(name: str, array: np.ndarray, code: str | None = None) -> str:
    dtype = array.dtype.newbyteorder("<")
    if code is None:
        code = _CODE.get(dtype)
    if code is None or NUMPY_DTYPES.get(code) != dtype:
        raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be written"
                         + ("" if code is None else f" as {code}"))
    return code


def write_safetensors(path: str | os.PathLike, tensors: list[tuple],
                      metadata: dict[str, str] | None = None) -> None:
    """Write the named arrays (F16, F32, F64, I8, I32, I64, U8 or BOOL, or BF16 when the entry
    says so: see safetensors_header) as a safetensors file, atomically, in the order given."""
    header = safetensors_header(tensors, metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Spaces, as the safetensors library pads, so that tensor data starts 8-aligned.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_writer(path) as f:
        f.write(_LENGTH.pack(len(header_bytes)))
        f.write(header_bytes)
        for _, array, *_ in tensors:
            # one tensor at a time made contiguous little-endian: never the whole file in memory
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data)
