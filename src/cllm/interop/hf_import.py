"""`cllm import`: a Hugging Face GPT-2 checkpoint folder, or a model of the local Hugging Face
cache, to a cllm Model with its tokenizer.

Everything is read as untrusted input: file sizes are bounded before reading, JSON types are
checked, every tensor's dtype, shape and byte range are checked against config.json before the
model's buffer is allocated, and pickle files (pytorch_model.bin, ...) are refused, since
loading one runs code from it. cllm downloads nothing."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..config import GPT2_SWITCHES, ModelConfig
from ..model import Model
from .common import END_OF_TEXT, InteropError, cllm_name, hf_name, read_json, read_text
from .tensorfile import FLOAT_DTYPES, TensorFile

CONFIG_BYTES = 1 << 20
INDEX_BYTES = 64 << 20
TOKENIZER_BYTES = 256 << 20
# Sizes no GPT-2 comes near; they bound what config.json can ask cllm to allocate (the tensor
# files bound it further: every tensor must lie inside them).
LIMITS = dict(vocab_size=1 << 24, n_positions=1 << 20, n_embd=1 << 16, n_layer=1 << 10,
              n_head=1 << 12, n_inner=1 << 18)
# GELU with the tanh approximation, which cllm computes (vecmath.h), under the names
# transformers gives it; "gelu_fast" is the same formula written with x * x inside.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LAYER_NORM_EPS = 1e-5   # the epsilon of cllm's LayerNorm (_core.pyx)
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# Buffers of old transformers versions (the causal mask and its fill value): not parameters.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def download_hint(repo_id: str) -> str:
    return (f"huggingface-cli download {repo_id} --include '*.json' '*.safetensors' '*.txt'")


def import_model(source: str) -> tuple[Model, Path]:
    """The model of a GPT-2 folder or cached model name, and the folder it came from."""
    folder = resolve_source(source)
    config = read_config(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise InteropError(f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} tokens "
                           f"but the model only {config.vocab_size}")
    tensors = read_tensors(folder, config)
    return Model(config, config.flatten(tensors), tokenizer), folder


# ---- where the model is ----

def hub_cache() -> Path:
    """The Hugging Face hub cache, where huggingface_hub puts what it downloads."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def resolve_source(source: str) -> Path:
    """A folder as given, or the snapshot of a model name in the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InteropError(f"{source}: a file; give the folder that holds config.json and "
                           f"model.safetensors, or a model name such as gpt2")
    if not _REPO_ID.fullmatch(source):
        raise InteropError(f"{source}: no such folder")
    cache = hub_cache()
    snapshot = _cached_snapshot(cache, source)
    if snapshot is None:
        raise InteropError(f"{source}: no such folder, and no model {source!r} in the Hugging "
                           f"Face cache ({cache}); cllm downloads nothing: fetch it with "
                           f"`{download_hint(source)}`, then run this again")
    return snapshot


def _cached_snapshot(cache: Path, repo_id: str) -> Path | None:
    repos = [cache / f"models--{repo_id.replace('/', '--')}"]
    if "/" not in repo_id and not repos[0].is_dir():
        # a bare name (gpt2, distilgpt2) also finds the model under its organisation
        # (openai-community/gpt2) when that is the only one of the name
        found = sorted(cache.glob(f"models--*--{repo_id}")) if cache.is_dir() else []
        repos = found if len(found) == 1 else repos
    repo = repos[0]
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        if _COMMIT.fullmatch(commit) and (repo / "snapshots" / commit).is_dir():
            return repo / "snapshots" / commit
    snapshots = [s for s in (repo / "snapshots").glob("*") if (s / "config.json").is_file()] \
        if (repo / "snapshots").is_dir() else []
    return max(snapshots, key=lambda s: s.stat().st_mtime) if snapshots else None


# ---- config.json ----

def read_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a GPT-2 config.json, after refusing every setting cllm does not
    compute. tie_embeddings is config.json's tie_word_embeddings (read_tensors holds the
    tensors to it)."""
    path = folder / "config.json"
    if not path.is_file():
        raise InteropError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    c = read_json(path, CONFIG_BYTES, "a model configuration")
    if not isinstance(c, dict):
        raise InteropError(f"{path}: not a JSON object")
    tie = c.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise InteropError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    model_type = c.get("model_type")
    if model_type != "gpt2":
        raise InteropError(f"{path}: model_type {model_type!r} is not GPT-2; cllm imports "
                           f"GPT-2 models only (model_type \"gpt2\")")
    architectures = c.get("architectures", ["GPT2LMHeadModel"])
    if not (isinstance(architectures, list) and architectures
            and all(a in ARCHITECTURES for a in architectures)):
        raise InteropError(f"{path}: architectures {architectures!r}: cllm imports "
                           f"{' and '.join(ARCHITECTURES)} only")
    activation = c.get("activation_function", "gelu_new")
    if activation not in TANH_GELU:
        raise InteropError(f"{path}: activation_function {activation!r}: cllm computes GELU "
                           f"with the tanh approximation only ({', '.join(TANH_GELU)})")
    eps = c.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps != LAYER_NORM_EPS:
        raise InteropError(f"{path}: layer_norm_epsilon {eps!r}: cllm's LayerNorm uses "
                           f"epsilon {LAYER_NORM_EPS:g} only")
    for name, supported in (("scale_attn_weights", True),
                            ("scale_attn_by_inverse_layer_idx", False),
                            ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        value = c.get(name, supported)
        if value is not supported:
            raise InteropError(f"{path}: {name} is {json.dumps(value)}: cllm computes GPT-2 "
                               f"with {name} {json.dumps(supported)} only")
    n_ctx = c.get("n_positions", c.get("n_ctx"))
    sizes = {name: c.get(name) for name in ("vocab_size", "n_embd", "n_layer", "n_head")}
    sizes["n_positions"] = n_ctx
    for name, value in sizes.items():
        _check_size(path, name, value)
    n_inner = c.get("n_inner")
    if n_inner is not None:
        _check_size(path, "n_inner", n_inner)
    if sizes["n_embd"] % sizes["n_head"]:
        raise InteropError(f"{path}: n_embd ({sizes['n_embd']}) is not divisible by n_head "
                           f"({sizes['n_head']})")
    return ModelConfig(vocab_size=sizes["vocab_size"], n_ctx=n_ctx, n_embd=sizes["n_embd"],
                       n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_inner=n_inner,
                       tie_embeddings=tie, **GPT2_SWITCHES)


def _check_size(path: Path, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMITS[name]:
        raise InteropError(f"{path}: {name} must be an integer from 1 to {LIMITS[name]:,}, "
                           f"got {value!r}")


# ---- the tensors ----

def read_tensors(folder: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """cllm name -> float32 array of every parameter of `config`, each checked against it:
    lm_head.weight (absent, or equal to wte) is dropped for a tied head, required for an
    untied one."""
    files = _tensor_files(folder)
    found: dict[str, tuple[TensorFile, str]] = {}
    for file in files:
        for name, entry in file.entries.items():
            ours = cllm_name(name)
            if _BUFFER.fullmatch(ours):
                continue
            if ours in found:
                raise InteropError(f"{file.path}: tensor {name!r} appears twice (with and "
                                   f"without the transformer. prefix, or in two shards)")
            found[ours] = (file, name)
    expected = dict(ModelConfig(**{**config.to_dict(), "tie_embeddings": True}).tensor_shapes())
    expected["lm_head.weight"] = (config.vocab_size, config.n_embd)
    for ours, (file, name) in found.items():
        entry = file.entries[name]
        if ours not in expected:
            raise InteropError(f"{file.path}: tensor {name!r} is not part of a GPT-2 with the "
                               f"configuration of config.json")
        if entry.shape != expected[ours]:
            raise InteropError(f"{file.path}: tensor {name!r} has shape {entry.shape} but "
                               f"config.json makes it {expected[ours]}")
        if entry.dtype not in FLOAT_DTYPES:
            raise InteropError(f"{file.path}: tensor {name!r} holds {entry.dtype}; GPT-2 "
                               f"parameters are floating-point ({', '.join(FLOAT_DTYPES)})")
    missing = [name for name in expected if name not in found and name != "lm_head.weight"]
    if missing:
        raise InteropError(f"{folder}: tensor {hf_name(missing[0])!r} is missing"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors = {ours: file.float32(name) for ours, (file, name) in found.items()}
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, tensors["wte"]):
        if config.tie_embeddings:
            raise InteropError(f"{folder}: config.json ties the head to the embeddings "
                               f"(tie_word_embeddings) but lm_head.weight differs from "
                               f"wte.weight; set \"tie_word_embeddings\": false in config.json "
                               f"if the head is its own")
        tensors["lm_head.weight"] = head
    elif not config.tie_embeddings:
        if head is None:
            raise InteropError(f"{folder}: config.json unties the head (tie_word_embeddings "
                               f"false) but lm_head.weight is missing")
        # equal to wte today, but its own parameter when the model trains on
        tensors["lm_head.weight"] = head
    return tensors


def _tensor_files(folder: Path) -> list[TensorFile]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [TensorFile(single)]
    if index.is_file():
        content = read_json(index, INDEX_BYTES, "a safetensors index")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise InteropError(f"{index}: no weight_map of tensor names to file names")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            # shard names are plain file names beside the index: nothing outside the folder
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise InteropError(f"{index}: shard {shard!r} is not a .safetensors file name "
                                   f"in the folder")
        files = [TensorFile(folder / shard) for shard in shards]
        for file in files:
            for name in file.entries:
                if weight_map.get(name) != file.path.name:
                    raise InteropError(f"{file.path}: tensor {name!r} is not where {index.name} "
                                       f"puts it")
        return files
    pickles = sorted({p.name for pattern in _PICKLES for p in folder.glob(pattern)})
    if pickles:
        raise InteropError(
            f"{folder / pickles[0]} is a pickle file, and loading one runs code from it: cllm "
            f"reads model.safetensors only; convert it where you trust the file, e.g. "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}')\" (which writes "
            f"model.safetensors)")
    raise InteropError(f"{folder}: no model.safetensors (nor model.safetensors.index.json)")


# ---- the tokenizer ----

def read_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json and merges.txt built into the same byte-level BPE
    that transformers builds from them."""
    path = folder / "tokenizer.json"
    if path.is_file():
        text = read_text(path, TOKENIZER_BYTES, "a tokenizer")
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed input
            raise InteropError(f"{path}: not a tokenizers JSON document: {e}") from e
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = _gpt2_tokenizer(folder)
    else:
        raise InteropError(f"{folder}: no tokenizer: cllm needs tokenizer.json, or vocab.json "
                           f"and merges.txt")
    # cllm encodes whole files: a truncation or padding saved with the tokenizer would cut or
    # pad them silently
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _gpt2_tokenizer(folder: Path) -> Tokenizer:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab = read_json(vocab_path, TOKENIZER_BYTES, "a vocabulary")
    if not (isinstance(vocab, dict) and vocab and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < LIMITS["vocab_size"]
            for i in vocab.values())):
        raise InteropError(f"{vocab_path}: not an object of tokens to ids (integers from 0)")
    if len(set(vocab.values())) != len(vocab):
        raise InteropError(f"{vocab_path}: two tokens share an id")
    merges = []
    for number, line in enumerate(read_text(merges_path, TOKENIZER_BYTES,
                                            "BPE merges").splitlines(), 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab \
                or pair[0] + pair[1] not in vocab:
            raise InteropError(f"{merges_path}, line {number}: not a merge of two tokens of "
                               f"vocab.json into a third")
        merges.append((pair[0], pair[1]))
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if END_OF_TEXT in vocab:
        tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True)])
    return tokenizer
