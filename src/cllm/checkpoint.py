"""The .cllm file: a safetensors file holding a model's float32 parameters under their
ModelConfig names, or its weights quantized for generation, with string metadata:

    format          "cllm"
    format_version  "1"
    config          the ModelConfig as JSON
    tokenizer       the tokenizer as `tokenizers` JSON (absent for a model without one)
    weights         "bf16" or "int8" for a file of weights quantized for generation; absent
                    for float32 parameters
    training        JSON object from the trainer: step, RNG state, data position, run args
                    (training checkpoints only)
    digest          {"algorithm": "sha256", "tensors": hex, "header": hex}: the digest of
                    the tensor data, and of the header without this entry (every other
                    metadata entry and every tensor's dtype, shape and offsets) as canonical
                    JSON. Checked on load; files written before it load with a notice.

A training checkpoint also holds the AdamW moments as tensors `optim.m.<name>` and
`optim.v.<name>`. A quantized file holds the tensors of quantize.quantized_tensor_specs: each
matrix generation reads as `<name>.bf16` (BF16), or as `<name>.q8` (I8) and `<name>.q8_scale`
(F32), the other tensors float32; it is never a training checkpoint (no moments, no training
state).

Any safetensors reader opens these files; this module writes them by streaming each array to
disk (no whole-file copy in memory) and reads them by mapping the file, so loading a model
costs no copy of its weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import safejson
from .config import LAYER_TENSORS, ModelConfig
from .errors import CheckpointError, NonFiniteError, UnverifiedFile
from .interop.tensorfile import ITEMSIZE, NUMPY_DTYPES, safetensors_header, write_safetensors
from .quantize import FORMATS, quantized_tensor_specs

FORMAT = "cllm"
FORMAT_VERSION = "1"
MOMENTS = ("m", "v")
_HEADER_LENGTH = struct.Struct("<Q")
# The safetensors library refuses headers above 100 MB; a larger length means a foreign file.
_MAX_HEADER_BYTES = 100_000_000
_FLOAT32 = np.dtype("<f4")
WEIGHT_FORMATS = ("float32", *FORMATS)
# Bytes of one matrix weight in a file of each weight format: the bound on the parameters a
# file of that size can hold.
_WEIGHT_BYTES = {"float32": 4, "bf16": 2, "int8": 1}
# The exponent bits of a bfloat16: all ones for infinity and NaN.
_BF16_EXPONENT = 0x7F80
# Values are checked this many at a time, so that checking costs no copy of a large tensor.
_CHECK_BLOCK = 1 << 20
_CHECKPOINT_NAME = re.compile(r"checkpoint_step_(\d+)\.cllm")
_DIGEST = "sha256"
# Tables the core derives from the configuration alone (angular rotations, Ulam neighbour
# lists) may hold at most this many entries beyond one per float of the file's tensors, so
# that the work and memory a file can ask for stay proportional to its size.
_DERIVED_SLACK = 1 << 16
# The key/value cache of generation (2 x layers x context x width floats) may hold this many
# entries per float of the file's tensors, and this many besides: GPT-2 needs 0.15 per
# parameter, a model of 9 layers of width 64 and a context of 16384 about 17.
_CACHE_PER_PARAMETER = 64
_CACHE_SLACK = 1 << 24


@dataclass
class CllmFile:
    config: ModelConfig
    # The parameters by ModelConfig name; for quantized weights, the file's tensors by their
    # names in the file (quantize.quantized_tensor_specs).
    params: dict[str, np.ndarray]
    # The parameters as one array in ModelConfig.layout() order, when the file stores them
    # back to back in that order (save_cllm does), else None (always for quantized weights).
    flat: np.ndarray | None
    tokenizer_json: str | None
    optimizer: dict[str, dict[str, np.ndarray]] | None
    training: dict | None
    weights: str = "float32"    # one of WEIGHT_FORMATS


def save_cllm(path: str | os.PathLike, params: dict[str, np.ndarray], config: ModelConfig,
              tokenizer_json: str | None,
              optimizer: dict[str, dict[str, np.ndarray]] | None = None,
              training: dict | None = None, weights: str = "float32") -> None:
    """Write a .cllm file atomically. `optimizer` maps "m" and "v" to arrays named like
    `params`; `training` is any JSON-able dict. With quantized `weights` ("bf16" or "int8"),
    `params` are the tensors of quantize.quantized_tensor_specs (quantize_tensors makes them),
    and there is no optimizer or training state. Names, shapes and dtypes are checked against
    `config`."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    if weights != "float32" and (optimizer is not None or training is not None):
        raise ValueError("a file of quantized weights is for generation: it holds no optimizer "
                         "or training state")
    tensors = dict(params)
    if optimizer is not None:
        for moment in MOMENTS:
            tensors.update({f"optim.{moment}.{name}": array
                            for name, array in optimizer[moment].items()})
    expected = _expected_tensors(config, weights, moments=optimizer is not None)
    _check_names(path, tensors, expected, weights)
    _check_shapes(path, {name: array.shape for name, array in tensors.items()}, expected)
    arrays = [(name, _stored_array(name, tensors[name], dtype), dtype)
              for name, (dtype, _) in expected.items()]
    for name, array, dtype in arrays:
        if not all_finite(array, dtype):
            raise NonFiniteError(f"{path}: not written: tensor {name} holds values that are "
                                 f"not finite (NaN or infinity)")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_json()}
    if tokenizer_json is not None:
        metadata["tokenizer"] = tokenizer_json
    if training is not None:
        metadata["training"] = json.dumps(training)
    if weights != "float32":
        metadata["weights"] = weights

    data_digest = hashlib.new(_DIGEST)
    for _, array, _ in arrays:
        data_digest.update(array.data)
    metadata["digest"] = json.dumps({"algorithm": _DIGEST, "tensors": data_digest.hexdigest(),
                                     "header": _header_digest(safetensors_header(arrays,
                                                                                 metadata))})
    write_safetensors(path, arrays, metadata)


def load_cllm(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> CllmFile:
    """Read and fully validate a .cllm file, its digests too unless not `verify`. With `mmap`,
    the arrays are read-only views of the mapped file; without, they are writable arrays over
    one in-memory copy of it. Work and memory before the file is accepted are proportional to
    its size."""
    path = Path(path)
    buffer = _read(path, mmap)
    header, data_start = _parse_header(path, buffer)
    metadata = header.get("__metadata__")
    config, weights, tokenizer_json, training = _parse_metadata(path, metadata)
    tensor_entries = {name: info for name, info in header.items() if name != "__metadata__"}
    data_bytes = len(buffer) - data_start
    _check_config_fits_file(path, config, len(tensor_entries),
                            data_bytes // _WEIGHT_BYTES[weights])
    expected = _expected_tensors(config, weights,
                                 moments=any(name.startswith("optim.") for name in tensor_entries))
    _check_names(path, tensor_entries, expected, weights)
    spans = {name: _tensor_span(path, name, info, expected[name][0], weights)
             for name, info in tensor_entries.items()}
    _check_spans_fill_data(path, spans, data_bytes)
    _check_shapes(path, {name: shape for name, (shape, _, _) in spans.items()}, expected)
    if verify:
        _check_digest(path, header, memoryview(buffer)[data_start:])

    tensors = {name: np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype], count=math.prod(shape),
                                   offset=data_start + spans[name][1]).reshape(shape)
               for name, (dtype, shape) in expected.items()}
    if weights != "float32":
        _check_quantized_values(path, tensors, expected)
        return CllmFile(config, tensors, None, tokenizer_json, None, None, weights)
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


def load_float32_cllm(path: str | os.PathLike, use: str) -> CllmFile:
    """load_cllm of a file whose float32 parameters are needed (to train them, to quantize
    them): a file of quantized weights is refused, telling to `use` the float32 model."""
    f = load_cllm(path)
    if f.weights != "float32":
        raise CheckpointError(f"{path} holds {f.weights} weights: a quantized model is for "
                              f"generation; {use} the float32 model it came from")
    return f


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
        header = safejson.loads(bytes(buffer[_HEADER_LENGTH.size:data_start]).decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a .cllm file, or a damaged one (its header is "
                              f"not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a .cllm file (its header is not a JSON object)")
    return header, data_start


def _parse_metadata(path: Path, metadata) -> tuple[ModelConfig, str, str | None, dict | None]:
    """The configuration, weight format, tokenizer JSON and training state."""
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
    weights = metadata.get("weights", "float32")
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"{path}: unknown weight format {weights!r} (cllm reads "
                              f"{', '.join(WEIGHT_FORMATS)})")
    training = None
    if "training" in metadata:
        if weights != "float32":
            raise CheckpointError(f"{path}: damaged .cllm file (a file of {weights} weights, "
                                  f"which is for generation, holds a training state)")
        try:
            training = _json_object(metadata["training"])
        except ValueError as e:
            raise CheckpointError(f"{path}: invalid training state: {e}") from e
    return config, weights, metadata.get("tokenizer"), training


def _json_object(text: str | None) -> dict:
    if text is None:
        raise ValueError("it is missing")
    value = safejson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("it is not a JSON object")
    return value


def _check_config_fits_file(path: Path, config: ModelConfig, tensors: int,
                            parameters: int) -> None:
    """Before the configuration is expanded into its tensor list: its layers must be among
    the file's tensors, and the tables derived from it alone must be no larger than the file,
    which holds at most `parameters` weights."""
    needed = len(LAYER_TENSORS) * config.n_layer
    if needed > tensors:
        raise CheckpointError(f"{path}: damaged .cllm file (its configuration has "
                              f"{config.n_layer} layers, {needed} layer tensors, but the file "
                              f"holds {tensors} tensors)")
    derived = 0
    if config.position == "angular":
        derived += config.n_ctx * config.n_embd
    if config.attention == "ulam":
        derived += config.n_ctx * min(config.n_ctx, (2 * config.ulam_radius + 1) ** 2)
    if derived > parameters + _DERIVED_SLACK:
        raise CheckpointError(f"{path}: implausible configuration (context {config.n_ctx} and "
                              f"Ulam radius {config.ulam_radius} ask for tables of {derived:,} "
                              f"entries, more than the file's {parameters:,} parameters)")
    # Generation keeps keys and values of every layer for the whole context, allocated at once:
    # many narrow layers and a long context would make a file of a few MB ask for tens of GB.
    cache = 2 * config.n_layer * config.n_ctx * config.n_embd
    allowed = _CACHE_PER_PARAMETER * parameters + _CACHE_SLACK
    if cache > allowed:
        raise CheckpointError(f"{path}: implausible configuration ({config.n_layer} layers of "
                              f"width {config.n_embd} and context {config.n_ctx} ask for a "
                              f"generation cache of {cache:,} entries, more than the "
                              f"{allowed:,} a file of {parameters:,} parameters may ask "
                              f"for)")


def _header_digest(header: dict) -> str:
    """The digest of the header without its digest entry, as canonical JSON."""
    metadata = {key: value for key, value in header["__metadata__"].items() if key != "digest"}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.new(_DIGEST, canonical.encode("utf-8")).hexdigest()


def _check_digest(path: Path, header: dict, data: memoryview) -> None:
    text = header["__metadata__"].get("digest")
    if text is None:
        warnings.warn(f"{path} has no integrity digest (written by cllm 0.1): it loads "
                      f"unchecked, and is written with one when saved again", UnverifiedFile)
        return
    try:
        digest = safejson.loads(text)
        algorithm, tensors, whole = digest["algorithm"], digest["tensors"], digest["header"]
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: damaged .cllm file (unreadable digest: {e})") from e
    if algorithm != _DIGEST:
        raise CheckpointError(f"{path}: digest algorithm {algorithm!r} is not supported "
                              f"(cllm checks {_DIGEST})")
    if whole != _header_digest(header):
        raise CheckpointError(f"{path}: damaged or altered .cllm file (its configuration, "
                              f"metadata or tensor list does not match its digest)")
    if tensors != hashlib.new(_DIGEST, data).hexdigest():
        raise CheckpointError(f"{path}: damaged or altered .cllm file (its tensor data does "
                              f"not match its digest)")


def _tensor_span(path: Path, name: str, info, dtype: str,
                 weights: str) -> tuple[tuple[int, ...], int, int]:
    """A tensor's shape, the offset of its data and its length in bytes, after checking its
    header entry against its dtype in a file of `weights`."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{path}: damaged .cllm file (header entry of tensor {name} is "
                              f"not a safetensors tensor description)")
    if info["dtype"] != dtype:
        holds = (".cllm files hold float32 (F32) tensors" if weights == "float32" else
                 f"a .cllm file of {weights} weights holds it as {dtype}")
        raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']!r} but {holds}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (_is_index_list(shape) and _is_index_list(offsets) and len(offsets) == 2
            and offsets[1] - offsets[0] == math.prod(shape) * ITEMSIZE[dtype]):
        raise CheckpointError(f"{path}: damaged .cllm file (shape {shape} and byte range "
                              f"{offsets} of tensor {name} do not agree)")
    return tuple(shape), offsets[0], offsets[1] - offsets[0]


def _is_index_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _check_spans_fill_data(path: Path, spans: dict, data_bytes: int) -> None:
    """Tensor data must tile the rest of the file exactly, as the safetensors format requires."""
    end = 0
    for _, begin, length in sorted(spans.values(), key=lambda span: span[1]):
        if begin != end:
            raise CheckpointError(f"{path}: damaged .cllm file (tensor data overlaps or has "
                                  f"gaps at byte {end})")
        end = begin + length
    if end > data_bytes:
        raise CheckpointError(f"{path}: truncated (the header describes {end} bytes of tensor "
                              f"data but only {data_bytes} follow it)")
    if end < data_bytes:
        raise CheckpointError(f"{path}: damaged .cllm file ({data_bytes - end} unexpected "
                              f"bytes after the tensor data)")


def _expected_tensors(config: ModelConfig, weights: str,
                      moments: bool) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of the tensors of a file of `weights`, in file order: the
    configuration's, and with `moments` (float32 only) all the optimizer moments."""
    expected = quantized_tensor_specs(config, weights)
    if moments and weights == "float32":
        expected.update({f"optim.{moment}.{name}": ("F32", shape)
                         for moment in MOMENTS for name, shape in config.tensor_shapes()})
    return expected


def _check_names(path, names, expected: dict, weights: str) -> None:
    """Exactly the expected tensors: the configuration's, plus either all optimizer moments
    or none of them, and none in a file of quantized weights."""
    for name in names:
        if name not in expected:
            if weights != "float32" and name.startswith("optim."):
                raise CheckpointError(f"{path}: damaged .cllm file (a file of {weights} "
                                      f"weights, which is for generation, holds the optimizer "
                                      f"tensor {name})")
            raise CheckpointError(f"{path}: unexpected tensor {name} (not part of the model "
                                  f"configuration)")
    for name in expected:
        if name not in names:
            raise CheckpointError(f"{path}: tensor {name} is missing")


def _check_shapes(path, shapes: dict[str, tuple[int, ...]], expected: dict) -> None:
    for name, (_, shape) in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(shapes[name])} but "
                                  f"the configuration needs {shape}")


def _stored_array(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """The array as a file stores it: a float32 tensor from any floating input, a quantized
    one (I8, or BF16 bits) as it is, given in its own dtype."""
    if dtype == "F32":
        return np.ascontiguousarray(array, dtype=_FLOAT32)
    if array.dtype != NUMPY_DTYPES[dtype]:
        raise ValueError(f"tensor {name}: {dtype} tensors are given as {NUMPY_DTYPES[dtype]}, "
                         f"not {array.dtype}")
    return np.ascontiguousarray(array)


def all_finite(array: np.ndarray, dtype: str = "F32") -> bool:
    """Whether every value of an array of safetensors `dtype` (BF16: its bits as uint16) is a
    finite number, checked a block at a time."""
    values = array.reshape(-1)
    for start in range(0, values.size, _CHECK_BLOCK):
        block = values[start:start + _CHECK_BLOCK]
        if dtype == "BF16":
            finite = ((block & _BF16_EXPONENT) != _BF16_EXPONENT).all()
        else:
            finite = np.isfinite(block).all()
        if not finite:
            return False
    return True


def _check_quantized_values(path: Path, tensors: dict[str, np.ndarray], expected: dict) -> None:
    """The values the core would compute garbage from without a word: bf16 weights that are
    not finite, int8 scales that are not finite or are negative."""
    for name, (dtype, _) in expected.items():
        if dtype == "BF16" and not all_finite(tensors[name], dtype):
            raise CheckpointError(f"{path}: damaged .cllm file (tensor {name} holds bf16 values "
                                  f"that are not finite, NaN or infinity)")
        if name.endswith(".q8_scale") and not (all_finite(tensors[name])
                                               and (tensors[name] >= 0).all()):
            raise CheckpointError(f"{path}: damaged .cllm file (tensor {name} holds int8 "
                                  f"scales that are negative or not finite)")


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
