"""Fuzzing the .cllm loader: thousands of mutated model and checkpoint files, each loaded in a
child process under an address-space limit and a timeout, through the command line (`cllm
infer -m FILE -p x -n 2`) or the library (load_cllm, Model.from_file and, for checkpoints,
resume.load_checkpoint). Each case ends in one of:

    clean       a one-line `error: ...` and exit 1 (the library: a CllmError)
    load        the file loaded (and the command generated its 2 tokens: exit 0)
    unforeseen  the command's last line of defence caught an exception that nothing foresaw
                (`error: Type: ... (set CLLM_TRACEBACK=1 to see where)`)
    traceback   a Python traceback (the library: any exception but a CllmError)
    crash       the child ended by a signal (segmentation fault, abort) or an unexpected code
    hang        the child ran past the timeout
    memory      the child met the address-space limit (MemoryError, `error: out of memory`,
                an allocation failure in native code)

Every case but `clean` and `load` is printed with its seed; `--seed S --cases 1` reruns it
alone (`--keep DIR` keeps the mutated files of those cases). Results go to bench/out/fuzz.md.

    python bench/fuzz.py [--cases 10000] [--seed 0] [--jobs 2] [--mode cli|api]
                         [--timeout 30] [--memory-mb 2048] [--keep DIR]

Starting Python and importing cllm costs about half a second, so each job is one long-lived
worker (`--worker`) that imports everything once and then forks a fresh child per case; the
child sets the limits, loads the file and reports. The worker itself never runs the core's
OpenMP code nor the tokenizer (neither is safe to use across a fork once started).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import resource
import select
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out" / "fuzz.md"

OUTCOMES = ("clean", "load", "unforeseen", "traceback", "crash", "hang", "memory")
GOOD = ("clean", "load")
_HEADER_LENGTH = struct.Struct("<Q")

# ---- the files mutated: small, deterministic, one of each kind cllm writes ----------------

BASES = ("char", "bpe", "bare", "checkpoint", "legacy")
_TEXT = ("the quick brown fox jumps over a lazy dog while seven red cats watch from an old "
         "stone wall, and the dog sleeps.\nA second line: digits 0123456789 (and punctuation!)\n")


def build_bases(folder: Path) -> dict[str, Path]:
    """Write the base files into `folder`: a model with a character tokenizer (angular
    positions, Ulam attention), one with a byte-level BPE (learned positions, dense attention,
    untied head), one without a tokenizer (lattice init, crystalline loss), a training
    checkpoint, and a checkpoint without a digest (as cllm 0.1 wrote them)."""
    import numpy as np
    from cllm.checkpoint import save_cllm
    from cllm.config import ModelConfig
    from cllm.model import Model
    from cllm.settings import TrainConfig
    from cllm.tokenizer import tokenizer_to_json, train_bpe, train_char

    folder.mkdir(parents=True, exist_ok=True)
    char = train_char([_TEXT])
    bpe = train_bpe([_TEXT * 4], 280)
    models = {
        "char": Model.create(ModelConfig(vocab_size=char.get_vocab_size(), n_ctx=16, n_embd=8,
                                         n_layer=1, n_head=2), seed=1, tokenizer=char),
        "bpe": Model.create(ModelConfig(vocab_size=bpe.get_vocab_size(), n_ctx=12, n_embd=4,
                                        n_layer=2, n_head=1, n_inner=6, tie_embeddings=False,
                                        position="learned", attention="dense"),
                            seed=2, tokenizer=bpe),
        "bare": Model.create(ModelConfig(vocab_size=20, n_ctx=8, n_embd=4, n_layer=1, n_head=2,
                                         init="lattice", loss="crystalline", ulam_radius=1),
                             seed=3),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.cllm"
        model.save(paths[name])
    # a training checkpoint as resume.save_checkpoint writes one
    model = models["char"]
    rng = np.random.default_rng([5, 1])
    rng.integers(0, 10, 7)
    moments = {m: {name: np.full(a.shape, 0.001 * (i + 1), np.float32)
                   for name, a in model.params.items()} for i, m in enumerate(("m", "v"))}
    training = dict(step=3, rng=rng.bit_generator.state, best_val_loss=2.5, elapsed=1.25,
                    settings=dataclasses.asdict(TrainConfig(data="corpus", tokenizer="char",
                                                            seq_len=8, max_steps=6)),
                    corpus={"files": [["a.txt", 120], ["sub/b.txt", 80]],
                            "dataset_sha256": hashlib.sha256(b"ids").hexdigest()})
    paths["checkpoint"] = folder / "checkpoint_step_3.cllm"
    save_cllm(paths["checkpoint"], model.params, model.config,
              tokenizer_to_json(model.tokenizer), moments, training)
    # the same without its digest, as cllm 0.1 wrote them: every check but the digest's
    header, data = split(paths["checkpoint"].read_bytes())
    del header["__metadata__"]["digest"]
    paths["legacy"] = folder / "legacy.cllm"
    paths["legacy"].write_bytes(join(header, data))
    return paths


def load_bases(folder: Path) -> dict[str, bytes]:
    return {name: (folder / ("checkpoint_step_3.cllm" if name == "checkpoint"
                             else f"{name}.cllm")).read_bytes() for name in BASES}


# ---- the file format, for writing hostile ones -----------------------------------------------

class Raw:
    """JSON text put into a header as it is (a 5000-digit number, nesting 3000 deep, 1e999),
    with the value Python's json would read from it, or None if it reads none."""

    def __init__(self, text: str, value=None):
        self.text, self.value = text, value


def split(data: bytes) -> tuple[dict, bytes]:
    """A well-formed .cllm file's header (parsed) and tensor data."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    return json.loads(data[8:8 + length]), data[8 + length:]


def dumps(value) -> str:
    """json.dumps, with each Raw value's text put in as it is."""
    raws: list[Raw] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(v)
            return f"\0RAW{len(raws) - 1}\0"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(value), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000RAW{i}\\u0000"', raw.text)
    return text


def join(header: dict, data: bytes, pad: bool = True) -> bytes:
    """A .cllm file of this header (which may hold Raw values) and tensor data."""
    text = dumps(header).encode("utf-8", "surrogatepass")
    if pad:
        text += b" " * (-len(text) % 8)
    return _HEADER_LENGTH.pack(len(text)) + text + data


def reseal(header: dict, data: bytes) -> bool:
    """Give the header the digest of itself and of `data`, as save_cllm would: a mutated file
    that passes the digest check meets every other check. False (and unchanged) where the
    header cannot carry one (no metadata object, Raw values json cannot read)."""
    from cllm.checkpoint import _header_digest
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return False

    def plain(v):
        if isinstance(v, Raw):
            if v.value is None:
                raise ValueError
            return v.value
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    try:
        digest = _header_digest(plain(header))
    except (ValueError, TypeError, AttributeError):
        return False
    metadata["digest"] = json.dumps({"algorithm": "sha256",
                                     "tensors": hashlib.sha256(data).hexdigest(),
                                     "header": digest})
    return True


# ---- hostile values --------------------------------------------------------------------------

_DEEP = 3000


def hostile_raw(rng: random.Random) -> Raw:
    return rng.choice([
        Raw("1" + "0" * 5000), Raw("-" + "9" * 4400), Raw("1" + "0" * 39, 10 ** 39),
        Raw("1e999", float("inf")), Raw("-1e999", float("-inf")), Raw("1e-999", 0.0),
        Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-0", 0),
        Raw("[" * _DEEP + "]" * _DEEP), Raw('{"a":' * _DEEP + "1" + "}" * _DEEP),
        Raw("[" * 60 + "]" * 60, json.loads("[" * 60 + "]" * 60)),
        Raw('"\\ud800"', "\ud800"), Raw('"\\u0000"', "\0"), Raw('"' + "x" * 200_000 + '"',
                                                                 "x" * 200_000),
        Raw("0." + "0" * 3000 + "1", 0.0), Raw("12345678901234567890123.5e3", 1.23456789e25),
    ])


def hostile_value(rng: random.Random):
    """Something to put where a JSON value was: every type, the edges of integers, and
    (as Raw) texts that strain a JSON reader."""
    if rng.random() < 0.25:
        return hostile_raw(rng)
    return rng.choice([
        0, -1, 1, 2, 3, 7, 255, 256, 2 ** 16, 2 ** 20, 2 ** 20 + 1, 2 ** 24, 2 ** 31, 2 ** 31 - 1,
        2 ** 32, 2 ** 53 + 1, 2 ** 63, 2 ** 64, -2 ** 63, 10 ** 7, 10 ** 30, 0.5, 1.0, 2.0,
        -0.0, 1e308, 3.4e38, 1e-45, True, False, None, "", "x", "F32", "F16", "I64", "abc" * 50,
        "\u00e9\U0001f600", [], [0], [1, 2], [-1, 4], [2 ** 62, 2 ** 62], [[1]], {}, {"a": 1},
        {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
    ])


# ---- mutations -------------------------------------------------------------------------------

KINDS = {
    # kind: (weight, what it does)
    "truncate": (6, "the file cut short at a random byte, or at a tensor boundary"),
    "append": (3, "random bytes added after the tensor data"),
    "length": (5, "the 8-byte header length rewritten (0, 1, off by a few, 2^63, larger "
                  "than the file)"),
    "header_bytes": (10, "1 to 8 bytes of the JSON header replaced (random, or JSON "
                         "punctuation and digits)"),
    "header_splice": (5, "a slice of the JSON header deleted or repeated, the length fixed"),
    "json_value": (12, "one value anywhere in the header (tensor dtype, shape, offsets, "
                       "metadata) replaced by a hostile one"),
    "json_key": (6, "a header key deleted, added or renamed (tensor names, metadata keys)"),
    "config": (14, "fields of the model configuration set to extreme or ill-typed values "
                   "(n_ctx 2^31, ulam_radius 1000, n_layer 10^6, strings, floats, deep "
                   "nesting)"),
    "config_consistent": (8, "a valid file with a random configuration whose derived "
                             "tables (context, Ulam radius) or generation cache (layers x "
                             "context) are large for its size"),
    "metadata": (8, "a metadata string (config, training, tokenizer, digest, format) "
                    "replaced: not JSON, nested thousands deep, a 5000-digit integer, "
                    "another type"),
    "tokenizer": (12, "the stored tokenizer JSON edited (model type, vocabulary empty or "
                      "larger than vocab_size, no [UNK], ids out of range, components, "
                      "byte flips)"),
    "training": (8, "fields of a checkpoint's training state set to ill-typed values "
                    "(\"lr\": \"x\", the RNG state, step, corpus record)"),
    "tensor_data": (8, "floats of the tensor data overwritten (NaN, infinity, 3e38, random "
                       "bytes)"),
    "dtype_shape": (6, "a tensor's dtype, shape or byte range changed"),
}
# how often a mutation of the header is resealed (given a fresh digest), so that the checks
# behind the digest see it too
_RESEAL = dict(json_value=0.5, json_key=0.5, config=0.7, metadata=0.7, tokenizer=0.95,
               training=0.95, tensor_data=0.5, dtype_shape=0.5, header_splice=0.0)


@dataclasses.dataclass
class Case:
    seed: int
    base: str
    kind: str
    detail: str
    data: bytes
    # the loader must refuse it: the file has a digest and its tensor data changed without a
    # fresh digest
    must_refuse: bool = False


def make_case(bases: dict[str, bytes], seed: int, only: str | None = None) -> Case:
    """The mutated file of one seed: the same for every run, worker and machine (`only`: of
    that kind of mutation, whatever the seed would choose)."""
    rng = random.Random(f"cllm-fuzz:{seed}")
    kind = rng.choices(list(KINDS), weights=[w for w, _ in KINDS.values()])[0]
    if only:
        kind = only
    if kind == "training":
        base = rng.choice(["checkpoint", "legacy"])
    else:
        base = rng.choice(BASES)
    case = Case(seed, base, kind, "", b"")
    data = bases[base]
    header, tensors = split(data)
    case.data, case.detail = globals()[f"_mutate_{kind}"](rng, data, header, tensors, case)
    return case


def _finish(rng, kind, header, tensors, detail, pad=True):
    sealed = "__metadata__" in header and rng.random() < _RESEAL.get(kind, 0) \
        and reseal(header, tensors)
    return join(header, tensors, pad), detail + (" (resealed)" if sealed else "")


def _mutate_truncate(rng, data, header, tensors, case):
    start = len(data) - len(tensors)
    if rng.random() < 0.5:
        cut = rng.randrange(len(data))
    else:
        ends = sorted({start + info["data_offsets"][1] for name, info in header.items()
                       if name != "__metadata__"})
        cut = max(0, rng.choice(ends) + rng.randint(-4, 0))
        cut = min(cut, len(data) - 1)
    return data[:cut], f"cut at byte {cut} of {len(data)}"


def _mutate_append(rng, data, header, tensors, case):
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return data + extra, f"{len(extra)} bytes appended"


def _mutate_length(rng, data, header, tensors, case):
    (length,) = _HEADER_LENGTH.unpack_from(data)
    new = rng.choice([0, 1, 2, 7, length - 1, length + 1, length - 8, length + 8,
                      length + rng.randint(-200, 200), len(data), len(data) - 8, 2 ** 63,
                      2 ** 64 - 1, 100_000_001, rng.randrange(2 ** 32)])
    new = max(0, min(new, 2 ** 64 - 1))
    return _HEADER_LENGTH.pack(new) + data[8:], f"header length {length} -> {new}"


_PUNCTUATION = b'{}[]":,0123456789-+.eE\\ tfn'


def _mutate_header_bytes(rng, data, header, tensors, case):
    (length,) = _HEADER_LENGTH.unpack_from(data)
    out = bytearray(data)
    places = []
    for _ in range(rng.randint(1, 8)):
        at = 8 + rng.randrange(length)
        out[at] = rng.choice(_PUNCTUATION) if rng.random() < 0.6 else rng.randrange(256)
        places.append(at)
    return bytes(out), f"header bytes at {sorted(places)} replaced"


def _mutate_header_splice(rng, data, header, tensors, case):
    (length,) = _HEADER_LENGTH.unpack_from(data)
    text = data[8:8 + length]
    a = rng.randrange(length)
    b = min(length, a + rng.choice([1, 2, 5, 20, 100, 1000]))
    delete = rng.random() < 0.5
    text = text[:a] + text[b:] if delete else text[:b] + text[a:]
    return (_HEADER_LENGTH.pack(len(text)) + text + tensors,
            f"header bytes {a}..{b} {'deleted' if delete else 'repeated'}")


def _locations(value, path=()):
    """Every (path) to a value in a JSON tree, the root excluded."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield path + (key,)
            yield from _locations(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield path + (i,)
            yield from _locations(item, path + (i,))


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _mutate_json_value(rng, data, header, tensors, case):
    path = rng.choice(list(_locations(header)))
    value = hostile_value(rng)
    _set(header, path, value)
    shown = value.text[:40] if isinstance(value, Raw) else repr(value)[:40]
    return _finish(rng, "json_value", header, tensors, f"{list(path)} = {shown}")


def _mutate_json_key(rng, data, header, tensors, case):
    tensor_names = [name for name in header if name != "__metadata__"]
    what = rng.choice(["delete tensor", "rename tensor", "add tensor", "delete metadata key",
                       "add metadata key", "delete entry field", "delete __metadata__"])
    if what == "delete tensor":
        name = rng.choice(tensor_names)
        del header[name]
    elif what == "rename tensor":
        name = rng.choice(tensor_names)
        new = rng.choice(["h.9.ln_1.weight", "optim.m.wte", "wpe", "lm_head.weight",
                          "__metadata__x", "", "\ud800", name + " ", "optim.x.wte"])
        header[new] = header.pop(name)
        name = f"{name} -> {new!r}"
    elif what == "add tensor":
        name = rng.choice(["extra", "wpe", "optim.m.extra", "h.1.ln_1.weight"])
        end = max(info["data_offsets"][1] for n, info in header.items() if n != "__metadata__")
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
        tensors += b"\0\0\0\0"
    elif what == "delete metadata key":
        name = rng.choice(list(header["__metadata__"]))
        del header["__metadata__"][name]
    elif what == "add metadata key":
        name = rng.choice(["extra", "Digest", "training", "tokenizer"])
        header["__metadata__"][name] = rng.choice(["{}", "x", '{"step": 1}'])
    elif what == "delete entry field":
        name = rng.choice(tensor_names)
        del header[name][rng.choice(["dtype", "shape", "data_offsets"])]
    else:
        name = ""
        del header["__metadata__"]
    return _finish(rng, "json_key", header, tensors, f"{what} {name}".strip())


_CONFIG_VALUES = {
    "n_ctx": [2 ** 31, 10 ** 7, 2 ** 20, 2 ** 20 + 1, 2 ** 16, 4097, 0, -1],
    "ulam_radius": [1000, 64, 65, 0, -3, 2 ** 40],
    "n_layer": [10 ** 6, 1024, 1025, 2, 0, 13],
    "n_head": [1, 3, 4, 8, 2 ** 12, 2 ** 13, 0],
    "n_embd": [2, 6, 16, 2 ** 16, 2 ** 17, 0],
    "n_inner": [None, 1, 2 ** 18, 2 ** 18 + 1, 0],
    "vocab_size": [1, 2 ** 24, 2 ** 24 + 1, 10 ** 9, 0],
    "tie_embeddings": [True, False, 0, 1, "true", None],
    "position": ["learned", "angular", "Angular", "", None],
    "attention": ["dense", "ulam", "sparse", None],
    "loss": ["ce", "crystalline", "mse"],
    "init": ["normal", "lattice", "zeros"],
    "crystalline_alpha": [0, 1, 0.5, -0.1, 1.5, "0.1", True, None],
}


def _mutate_config(rng, data, header, tensors, case):
    metadata = header["__metadata__"]
    config = json.loads(metadata["config"])
    changes = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        field = rng.choice(list(_CONFIG_VALUES) + ["unknown"])
        if field == "unknown":
            config[rng.choice(["n_positions", "", "bias"])] = 1
            changes.append("an unknown key")
            continue
        roll = rng.random()
        if roll < 0.7:
            value = rng.choice(_CONFIG_VALUES[field])
        elif roll < 0.9:
            value = hostile_value(rng)
        else:
            config.pop(field, None)
            changes.append(f"{field} removed")
            continue
        config[field] = value
        changes.append(f"{field} = {value.text[:30] if isinstance(value, Raw) else value!r}")
    text = dumps(config) if rng.random() < 0.95 else dumps([config])
    metadata["config"] = text
    return _finish(rng, "config", header, tensors, ", ".join(changes))


def _mutate_config_consistent(rng, data, header, tensors, case):
    """A file that save_cllm could have written, for a configuration that asks for large
    derived tables (or loads fine)."""
    import numpy as np
    from cllm.config import ModelConfig
    n_head = rng.choice([1, 2])
    n_embd = 2 * n_head * rng.choice([1, 1, 2])
    position = rng.choice(["angular", "angular", "learned"])
    attention = rng.choice(["ulam", "ulam", "dense"])
    n_ctx = rng.choice([1, 2, 15, 255, 1000, 4096, 65536, 2 ** 20]) if position == "angular" \
        else rng.choice([1, 3, 64, 512])
    radius = rng.choice([1, 2, 7, 30, 64])
    vocab = rng.choice([1, 2, 17, 300, 5000])
    try:
        config = ModelConfig(vocab_size=vocab, n_ctx=n_ctx, n_embd=n_embd,
                             n_layer=rng.choice([1, 1, 1, 3, 200]),
                             n_head=n_head, n_inner=rng.choice([1, 4]), position=position,
                             attention=attention, ulam_radius=radius,
                             loss=rng.choice(["ce", "crystalline"]))
    except ValueError as e:
        return data, f"no such configuration ({e}): the base file unchanged"
    values = np.random.default_rng(case.seed).standard_normal(config.layout()[1]) * 0.1
    params = config.views(values.astype(np.float32))
    metadata = dict(header["__metadata__"])
    metadata["config"] = config.to_json()
    if case.base == "bare" or vocab < 2 or "tokenizer" not in metadata:
        metadata.pop("tokenizer", None)
    metadata.pop("training", None)
    new = {"__metadata__": metadata}
    offset = 0
    chunks = []
    for name, array in params.items():
        new[name] = {"dtype": "F32", "shape": list(array.shape),
                     "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        chunks.append(array.astype("<f4").tobytes())
    body = b"".join(chunks)
    reseal(new, body)
    return join(new, body), (f"n_ctx {n_ctx}, ulam_radius {radius}, {position}, {attention}, "
                             f"n_embd {n_embd}, n_layer {config.n_layer}, vocab {vocab}")


def _mutate_metadata(rng, data, header, tensors, case):
    metadata = header["__metadata__"]
    key = rng.choice(["config", "config", "training", "tokenizer", "digest", "format",
                      "format_version"])
    value = rng.choice([
        "", "x", "{", "null", "[]", "{}", "1", '"config"', "[" * 5000 + "]" * 5000,
        '{"a":' * 5000 + "1" + "}" * 5000, "1" + "0" * 5000, '{"n_ctx": ' + "9" * 5000 + "}",
        '{"step": 1e999}', "NaN", '{"x": NaN}', "\ud800", "\0", "{" + " " * 100_000 + "}",
        "cllm", "2", "0", 5, None, [], {}, True,
        '{"algorithm": "sha256", "tensors": "0", "header": "0"}',
        '{"algorithm": "md5", "tensors": "", "header": ""}',
        '{"algorithm": "sha256"}', '[1, 2]',
    ])
    if key in metadata and rng.random() < 0.1:
        del metadata[key]
        detail = f"{key} removed"
    else:
        metadata[key] = value
        detail = f"{key} = {repr(value)[:40]}"
    return _finish(rng, "metadata", header, tensors, detail)


_COMPONENTS = [
    None, {}, {"type": "ByteLevel", "add_prefix_space": False}, {"type": "Nonsense"},
    {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
     "invert": False},
    {"type": "Sequence", "pretokenizers": []}, {"type": "Fuse"}, {"type": "NFKC"},
    {"type": "Replace", "pattern": {"String": ""}, "content": "xx"},
    {"type": "Metaspace", "replacement": "", "prepend_scheme": "always", "split": True},
    {"type": "Strip", "content": " ", "start": 10 ** 6, "stop": 0},
    {"type": "WordPiece", "prefix": "##", "cleanup": True},
    # chains that multiply the length of the text: a few hundred bytes that ask for gigabytes
    {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": "a"},
                                          "content": "a" * 100}] * 5},
    {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": ""},
                                          "content": "xy"}] * 40},
    {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False,
                                            "trim_offsets": True, "use_regex": True}] * 40},
    {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "a"},
                                       "content": "aaaa"}] * 20},
    # catastrophic backtracking in the Oniguruma engine
    {"type": "Split", "pattern": {"Regex": "(.|.)*\\x00"}, "behavior": "Isolated",
     "invert": False},
    {"type": "Replace", "pattern": {"Regex": "(a*)*b"}, "content": ""},
]


def _mutate_tokenizer(rng, data, header, tensors, case):
    metadata = header["__metadata__"]
    text = metadata.get("tokenizer")
    if text is None:  # the bare model: give it one of another model
        text = json.dumps({"version": "1.0", "truncation": None, "padding": None,
                           "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                           "post_processor": None, "decoder": None,
                           "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1},
                                     "unk_token": "[UNK]"}})
    tok = json.loads(text)
    model = tok["model"]
    vocab = model.get("vocab")
    what = rng.choice(["no unk", "empty vocab", "larger vocab", "ids", "model type",
                       "component", "added tokens", "byte flips", "deep", "merges",
                       "word level words", "truncation", "padding"])
    if what == "no unk":
        model.pop("unk_token", None)
        model["unk_token"] = rng.choice([None, "", "[MISSING]", 5])
    elif what == "empty vocab":
        model["vocab"] = {}
        if "merges" in model:
            model["merges"] = []
    elif what == "larger vocab":
        extra = rng.choice([1, 50, 400])
        start = len(vocab) if isinstance(vocab, dict) else 0
        model["vocab"] = {**(vocab or {}), **{f"tok{i}": start + i for i in range(extra)}}
    elif what == "ids":
        token = rng.choice(list(vocab)) if vocab else "a"
        model["vocab"] = {**(vocab or {}),
                          token: rng.choice([-1, 2 ** 32, 2 ** 31, 10 ** 6, 0, 1.5, "x", None])}
    elif what == "model type":
        model["type"] = rng.choice(["BPE", "WordLevel", "WordPiece", "Unigram", "Nope", 5])
        if model["type"] == "Unigram":
            model["vocab"] = rng.choice([[], [["a", 0.0]], [["a", "x"]], vocab])
    elif what == "component":
        slot = rng.choice(["pre_tokenizer", "normalizer", "decoder", "post_processor"])
        tok[slot] = copy.deepcopy(rng.choice(_COMPONENTS))
    elif what == "added tokens":
        tok["added_tokens"] = rng.choice([
            [{"id": rng.choice([0, 10 ** 6, 2 ** 32 - 1, -1]), "content": "<|x|>",
              "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True}],
            [{"id": 0}], "x", [None]])
    elif what == "merges":
        model["merges"] = rng.choice([["a"], [["zz", "q"]], ["a b c"], [5], None, "x"])
    elif what == "word level words":
        model["type"] = "WordLevel"
        model["vocab"] = {"hello": 0, "world": 1}
        model.pop("merges", None)
        model["unk_token"] = rng.choice([None, "[UNK]"])
    elif what == "truncation":
        tok["truncation"] = rng.choice([{"max_length": 0, "stride": 0, "strategy":
                                         "LongestFirst", "direction": "Right"},
                                        {"max_length": 1, "stride": 5, "strategy":
                                         "LongestFirst", "direction": "Right"}, 5])
    elif what == "padding":
        tok["padding"] = rng.choice([{"strategy": {"Fixed": 2 ** 40}, "direction": "Right",
                                      "pad_to_multiple_of": None, "pad_id": 0,
                                      "pad_type_id": 0, "pad_token": "[PAD]"}, "x"])
    text = json.dumps(tok, ensure_ascii=rng.random() < 0.5)
    if what == "deep":
        text = text[:-1] + ', "extra": ' + "[" * 4000 + "]" * 4000 + "}"
    elif what == "byte flips":
        chars = list(text)
        for _ in range(rng.randint(1, 6)):
            chars[rng.randrange(len(chars))] = chr(rng.choice(b'{}[]":,0123456789\\x '))
        text = "".join(chars)
    metadata["tokenizer"] = text
    return _finish(rng, "tokenizer", header, tensors, what)


def _mutate_training(rng, data, header, tensors, case):
    metadata = header["__metadata__"]
    training = json.loads(metadata["training"])
    settings = training.get("settings") or training.get("args")
    what = rng.choice(["setting", "setting", "setting", "step", "rng", "best", "elapsed",
                       "corpus", "settings", "missing"])
    if what == "setting":
        key = rng.choice(list(settings))
        settings[key] = rng.choice(["x", "", None, -1, 0, 0.5, 1e999, 10 ** 30, True, [], {},
                                    "char", "bpe", 3, 2.5e-4])
        detail = f"settings.{key} = {settings[key]!r}"
    elif what == "step":
        training["step"] = rng.choice([-1, 1.5, "3", None, True, 10 ** 30, 2 ** 63])
        detail = f"step = {training['step']!r}"
    elif what == "rng":
        state = training["rng"]
        which = rng.choice(["state", "inc", "bit_generator", "has_uint32", "uinteger",
                            "whole"])
        value = rng.choice([-1, 2 ** 128, 2 ** 200, 1.5, "x", None, [], {}, "MT19937"])
        if which in ("state", "inc"):
            state["state"][which] = value
        elif which == "whole":
            training["rng"] = value
        else:
            state[which] = value
        detail = f"rng.{which} = {value!r}"
    elif what == "best":
        training["best_val_loss"] = rng.choice([None, "x", 1e999, -1, True, []])
        detail = f"best_val_loss = {training['best_val_loss']!r}"
    elif what == "elapsed":
        training["elapsed"] = rng.choice([None, "x", 1e999, -1, True, [], 2 ** 70])
        detail = f"elapsed = {training['elapsed']!r}"
    elif what == "corpus":
        training["corpus"] = rng.choice([None, "x", {}, {"files": "x", "dataset_sha256": "0"},
                                         {"files": [["a", "b"]], "dataset_sha256": "0"},
                                         {"files": [[1, 2]], "dataset_sha256": 5}])
        detail = f"corpus = {training['corpus']!r}"
    elif what == "settings":
        value = rng.choice([None, "x", [], 5])
        training["settings" if "settings" in training else "args"] = value
        detail = f"settings = {value!r}"
    else:
        key = rng.choice(["step", "rng", "best_val_loss", "elapsed", "settings"])
        training.pop(key, None)
        detail = f"{key} removed"
    metadata["training"] = json.dumps(training)
    return _finish(rng, "training", header, tensors, detail)


def _mutate_tensor_data(rng, data, header, tensors, case):
    out = bytearray(tensors)
    values = [struct.pack("<f", v) for v in (float("nan"), float("inf"), float("-inf"),
                                               3e38, -3e38, 1e-45)]
    places = []
    for _ in range(rng.randint(1, 16)):
        at = 4 * rng.randrange(len(out) // 4)
        out[at:at + 4] = rng.choice(values) if rng.random() < 0.7 else rng.randbytes(4)
        places.append(at)
    changed = bytes(out) != tensors
    data, detail = _finish(rng, "tensor_data", header, bytes(out), f"floats at {sorted(places)}")
    # a file with a digest must be refused once its data changed without a fresh one
    case.must_refuse = changed and case.base != "legacy" and "resealed" not in detail
    return data, detail


def _mutate_dtype_shape(rng, data, header, tensors, case):
    name = rng.choice([n for n in header if n != "__metadata__"])
    entry = header[name]
    what = rng.choice(["dtype", "shape", "shape+offsets", "offsets", "swap"])
    if what == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "f32", "F32 ", 32])
    elif what == "shape":
        entry["shape"] = rng.choice([entry["shape"][::-1], entry["shape"] + [1],
                                     [1] + entry["shape"], [], [0], [2 ** 62, 4]])
    elif what == "shape+offsets":
        shape = rng.choice([entry["shape"][::-1], [entry["shape"][0]], [1], [0]])
        begin = entry["data_offsets"][0]
        size = 4
        for n in shape:
            size *= n
        entry["shape"], entry["data_offsets"] = shape, [begin, begin + size]
    elif what == "offsets":
        a, b = entry["data_offsets"]
        delta = rng.choice([-4, 4, -1, 8, 2 ** 40])
        entry["data_offsets"] = rng.choice([[a + delta, b + delta], [a, b + delta],
                                            [b, a], [a + delta, b]])
    else:
        other = rng.choice([n for n in header if n != "__metadata__"])
        entry["data_offsets"], header[other]["data_offsets"] = \
            header[other]["data_offsets"], entry["data_offsets"]
        name = f"{name} <-> {other}"
    return _finish(rng, "dtype_shape", header, tensors, f"{what} of {name}")


# ---- one case in a child process ----------------------------------------------------------

def _child(mode: str, path: str, memory_mb: int, timeout: float, out_fd: int,
           err_fd: int) -> None:
    """In the forked child: limits, then the load; never returns."""
    code = 70
    try:
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.setitimer(signal.ITIMER_REAL, timeout)  # SIGALRM's default action ends it
        code = _run_cli(path) if mode == "cli" else _run_api(path)
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_cli(path: str) -> int:
    """`python -m cllm infer -m FILE -p x -n 2`, as its __main__ runs it."""
    from cllm.cli import main
    try:
        return main(["infer", "-m", path, "-p", "x", "-n", "2", "--seed", "0"])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    # anything else escaping main() is printed as a traceback by _child


def _run_api(path: str) -> int:
    """load_cllm + Model.from_file, and for checkpoints resume.load_checkpoint: exit 0 for a
    load, 3 for a CllmError (its message on the output), 4 for any other exception (its
    traceback), 5 for MemoryError."""
    import warnings

    from cllm.checkpoint import load_cllm
    from cllm.errors import CllmError
    from cllm.model import Model
    from cllm.resume import load_checkpoint
    warnings.simplefilter("ignore")  # UnverifiedFile: legacy files load with it
    try:
        f = load_cllm(path)
        Model.from_file(f, path)
        if f.training is not None and f.optimizer is not None and f.tokenizer_json:
            load_checkpoint(Path(path))
    except CllmError as e:
        print(f"{type(e).__name__}: {e}")
        return 3
    except MemoryError:
        print("MemoryError")
        return 5
    except Exception:
        traceback.print_exc()
        return 4
    return 0


def classify(mode: str, status: int, output: str, killed: bool = False) -> tuple[str, str]:
    """The outcome of one case from its wait status and output (`killed`: by the worker,
    past the timeout), and a line to show. The output is the command's standard error (the
    library's report, in mode api)."""
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    memory_words = ("out of memory", "MemoryError", "memory allocation of",
                    "Cannot allocate memory", "std::bad_alloc")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGALRM or killed:
            return "hang", f"killed after the timeout; {last[:200]}"
        if any(word in output for word in memory_words):
            return "memory", last[:200]
        return "crash", f"signal {signal.Signals(sig).name}; {last[:200]}"
    code = os.WEXITSTATUS(status)
    if "Traceback (most recent call last)" in output:
        return "traceback", output.strip().splitlines()[-1][:300]
    if mode == "api":
        if code == 0:
            return "load", ""
        if code == 3:
            return "clean", last[:300]
        if code == 5:
            return "memory", last
        return "crash", f"exit {code}; {last[:200]}"
    if code == 0:
        return "load", ""
    if code == 1:
        errors = [line for line in lines if not line.startswith("notice: ")]
        if len(errors) == 1 and errors[0].startswith("error: "):
            if errors[0] == "error: out of memory":
                return "memory", errors[0]
            if errors[0].endswith("(set CLLM_TRACEBACK=1 to see where)"):
                return "unforeseen", errors[0][:300]
            return "clean", errors[0][:300]
        return "crash", f"exit 1 without one error line: {output.strip()[:300]!r}"
    return "crash", f"exit {code}; {last[:200]}"


def run_case(case: Case, mode: str, folder: Path, memory_mb: int, timeout: float) -> dict:
    path = folder / "case.cllm"
    path.unlink(missing_ok=True)   # a new file: never rewrite one a child still maps
    path.write_bytes(case.data)
    stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
    fds = [os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
           for name in (stdout, stderr)]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(mode, str(path), memory_mb, timeout, *fds)
    for fd in fds:
        os.close(fd)
    status, usage, killed = _wait(pid, timeout + 10)
    seconds = time.perf_counter() - start
    # the library's report goes to stdout; the command's errors to stderr
    text = (stdout if mode == "api" else stderr).read_text(encoding="utf-8", errors="replace")
    if mode == "api":
        text += stderr.read_text(encoding="utf-8", errors="replace")
    outcome, line = classify(mode, status, text, killed)
    if outcome == "load" and case.must_refuse:
        outcome, line = "unrefused", "tensor data changed without a fresh digest, yet it loaded"
    return dict(seed=case.seed, base=case.base, kind=case.kind, detail=case.detail[:300],
                outcome=outcome, line=line, seconds=round(seconds, 4),
                rss_mb=round(usage.ru_maxrss / 1024, 1))


def _wait(pid: int, limit: float):
    """The wait status and resource use of the child, and whether it was killed here: past
    `limit` (its own alarm should have ended it long before)."""
    killed = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], limit)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
        finally:
            os.close(pidfd)
    _, status, usage = os.wait4(pid, 0)
    return status, usage, killed


def worker(args) -> None:
    """Run cases first, first + stride, ... (count of them) and print one JSON line each."""
    # everything a child needs, imported once here (the children are forks of this process)
    import cllm.checkpoint  # noqa: F401
    import cllm.cli  # noqa: F401
    import cllm.infer  # noqa: F401
    import cllm.model  # noqa: F401
    import cllm.resume  # noqa: F401
    bases = load_bases(Path(args.base))
    with tempfile.TemporaryDirectory(prefix="cllm-fuzz-") as tmp:
        for i in range(args.first, args.first + args.count * args.stride, args.stride):
            case = make_case(bases, args.seed + i, args.kind)
            result = run_case(case, args.mode, Path(tmp), args.memory_mb, args.timeout)
            if args.keep and result["outcome"] not in GOOD:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"case_{case.seed}.cllm").write_bytes(case.data)
            print(json.dumps(result), flush=True)


# ---- the controller ----------------------------------------------------------------------

def worker_command(base: Path, mode: str, seed: int, first: int, count: int, stride: int,
                   timeout: float, memory_mb: int, keep: str | None = None,
                   kind: str | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--base", str(base),
               "--mode", mode, "--seed", str(seed), "--first", str(first), "--count",
               str(count), "--stride", str(stride), "--timeout", str(timeout),
               "--memory-mb", str(memory_mb)]
    return command + (["--keep", keep] if keep else []) + (["--kind", kind] if kind else [])


def worker_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CLLM_TRACEBACK", None)
    return env


def run_cases(base: Path, mode: str, seed: int, cases: int, jobs: int, timeout: float,
              memory_mb: int, keep: str | None = None, progress=None,
              kind: str | None = None) -> list[dict]:
    """Cases seed .. seed + cases - 1 over `jobs` workers; their results in seed order."""
    import subprocess
    jobs = max(1, min(jobs, cases))
    workers = []
    for j in range(jobs):
        count = len(range(j, cases, jobs))
        workers.append(subprocess.Popen(
            worker_command(base, mode, seed, j, count, jobs, timeout, memory_mb, keep, kind),
            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    streams = {w.stdout.fileno(): w for w in workers}
    buffers = {fd: "" for fd in streams}
    try:
        while streams:
            ready, _, _ = select.select(list(streams), [], [])
            for fd in ready:
                chunk = os.read(fd, 1 << 16).decode()
                if not chunk:
                    del streams[fd]
                    continue
                buffers[fd] += chunk
                *lines, buffers[fd] = buffers[fd].split("\n")
                for line in lines:
                    results.append(json.loads(line))
                    if progress:
                        progress(results[-1], len(results))
        for w in workers:
            err = w.stderr.read()
            if w.wait() != 0:
                raise RuntimeError(f"a fuzz worker failed (exit {w.returncode}): {err[-2000:]}")
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    return sorted(results, key=lambda r: r["seed"])


def report(results: list[dict], args, seconds: float) -> str:
    sys.path.insert(0, str(HERE))
    from common import machine_line
    counts = Counter(r["outcome"] for r in results)
    lines = [
        "# Fuzzing the .cllm loader", "",
        f"{machine_line()}. {len(results):,} cases (seeds {args.seed} to "
        f"{args.seed + len(results) - 1}) through "
        + ("the command line, `cllm infer -m FILE -p x -n 2`" if args.mode == "cli"
           else "the library (load_cllm, Model.from_file, load_checkpoint)")
        + f", each in a forked child limited to {args.memory_mb} MB of address space and "
        f"{args.timeout:g} s; {args.jobs} jobs, {seconds:.0f} s in all.", "",
        "| outcome | cases |", "|---|---:|",
        *[f"| {name} | {counts.get(name, 0):,} |" for name in OUTCOMES + ("unrefused",)
          if name in OUTCOMES or counts.get(name)],
        "",
        f"Slowest case {max(r['seconds'] for r in results):.2f} s (median "
        f"{sorted(r['seconds'] for r in results)[len(results) // 2] * 1000:.0f} ms); largest "
        f"peak RSS of a case {max(r['rss_mb'] for r in results):.0f} MB.", "",
        "## Mutations", "",
        "| kind | cases | clean | load | other | what it does |", "|---|---:|---:|---:|---:|---|",
    ]
    for kind, (_, what) in KINDS.items():
        mine = [r for r in results if r["kind"] == kind]
        c = Counter(r["outcome"] for r in mine)
        lines.append(f"| {kind} | {len(mine):,} | {c['clean']:,} | {c['load']:,} | "
                     f"{len(mine) - c['clean'] - c['load']:,} | {what} |")
    bad = [r for r in results if r["outcome"] not in GOOD]
    lines += ["", "## Cases that were not a clean error or a load", ""]
    if not bad:
        lines.append("None.")
    for r in bad:
        lines.append(f"- seed {r['seed']} ({r['outcome']}; {r['kind']} of {r['base']}: "
                     f"{r['detail']}): {r['line']}")
    errors = Counter(_message_kind(r["line"]) for r in results if r["outcome"] == "clean")
    lines += ["", "## The most frequent clean errors", "",
              *[f"- {n:,} x {text}" for text, n in errors.most_common(25)]]
    lines += ["", f"Reproduce one case: `python bench/fuzz.py --seed SEED --cases 1 --mode "
                  f"{args.mode} --keep DIR` (writes the file when the case is not clean).", ""]
    return "\n".join(lines)


def _message_kind(line: str) -> str:
    """An error line without the file name and the numbers, to group like errors."""
    import re
    text = re.sub(r"^(error: )?\S*case\.cllm:? ?", "", line)
    text = re.sub(r"\d[\d,._e+-]*", "N", text)
    return text[:120]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--mode", choices=("cli", "api"), default="cli")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--memory-mb", type=int, default=2048,
                        help="address-space limit of each case")
    parser.add_argument("--keep", metavar="DIR", help="write the files of cases that are "
                        "not clean into DIR")
    parser.add_argument("--kind", choices=list(KINDS), help="mutations of this kind only")
    parser.add_argument("--out", default=str(OUT), help="the report (default: %(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stride", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    sys.path.insert(0, str(REPO / "src"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cllm-fuzz-bases-") as tmp:
        build_bases(Path(tmp))

        def progress(result, done):
            if result["outcome"] not in GOOD:
                print(f"seed {result['seed']}: {result['outcome']} ({result['kind']} of "
                      f"{result['base']}: {result['detail']}): {result['line']}", flush=True)
            if done % 500 == 0 or done == args.cases:
                print(f"  {done:,} / {args.cases:,} cases, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)

        results = run_cases(Path(tmp), args.mode, args.seed, args.cases, args.jobs,
                            args.timeout, args.memory_mb, args.keep, progress, args.kind)
    seconds = time.perf_counter() - start
    text = report(results, args, seconds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    counts = Counter(r["outcome"] for r in results)
    print(", ".join(f"{name} {counts.get(name, 0):,}" for name in OUTCOMES)
          + (f", unrefused {counts['unrefused']:,}" if counts.get("unrefused") else "")
          + f"; {seconds:.0f} s; report in {out}")
    return 0 if all(r["outcome"] in GOOD for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
