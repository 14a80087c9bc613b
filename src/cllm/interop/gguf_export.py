"""`cllm export --to gguf`: a GGUF file that llama.cpp runs as architecture gpt2, written with
the gguf package (llama.cpp's own), tensors and metadata named as llama.cpp's converter names
them for GPT2LMHeadModel.

llama.cpp's gpt2 is GPT-2 itself: learned positions and dense causal attention. Angular
positions and Ulam attention have no place in it and are refused. Its tokenizer is GPT-2's
byte-level BPE (tokens spelled in GPT-2's byte characters, merges, the GPT-2 pre-tokenizer).
cllm's byte-level BPE is that tokenizer. A character tokenizer maps onto it exactly: each
character is the token of its UTF-8 bytes, reached by merges that only ever join the bytes of
one character (a merge's left side starts with a UTF-8 lead byte, its right side is a
continuation byte, so no merge can span two characters), and so every character of the
vocabulary becomes one token, as in cllm. llama.cpp skips a character the vocabulary lacks,
where cllm refuses it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..fileio import atomic_writer
from ..model import Model
from ..tokenizer import byte_level_spelling, tokenizer_kind
from .common import GGUF_TYPES, InteropError, end_of_text_id
from .hf_import import LAYER_NORM_EPS

ARCH = "gpt2"
PRE_TOKENIZER = "gpt-2"   # llama.cpp's name for GPT-2's pre-tokenizer regex
_F16_MAX = float(np.finfo(np.float16).max)
# llama.cpp refuses a gpt2 tokenizer without merges and gguf cannot write an empty array, so a
# vocabulary that needs none (ASCII characters, say) gets this one, which never applies: its
# sides are strings of several characters that no merge of the file produces, and BPE pieces
# start as single characters.
NO_MERGE = "cllm: no-merges"


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]        # gguf.TokenType values
    merges: list[str]       # "left right", by rank
    end_of_text: int | None


@dataclass(frozen=True)
class Summary:
    tensors: int
    bytes: int
    end_of_text: int | None


def export_gguf(model: Model, path: str | os.PathLike, type: str = "f32",
                name: str = "cllm") -> Summary:
    """Write the GGUF file atomically. `type` is the type of the matrices and of the token
    embeddings: f32, f16 or q8_0 (rows that do not split into blocks of 32 stay f16);
    LayerNorms, biases and the position table stay f32, as llama.cpp's converter keeps them."""
    import gguf

    if type not in GGUF_TYPES:
        raise ValueError(f"type must be one of {', '.join(GGUF_TYPES)}, got {type!r}")
    config = model.config
    refuse_inexpressible(config)
    if model.tokenizer is None:
        raise InteropError("the model has no tokenizer, and a GGUF file needs one for "
                           "llama.cpp to read text")
    vocab = gguf_vocab(model.tokenizer, config.vocab_size)
    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type])
    if type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.end_of_text is not None:
        writer.add_bos_token_id(vocab.end_of_text)
        writer.add_eos_token_id(vocab.end_of_text)
    # cllm adds no token to what it encodes
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    count = total = 0
    for gguf_name, array in gguf_tensors(model):
        data, raw_type = _encode(gguf, gguf_name, array, type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        count, total = count + 1, total + data.nbytes
    with atomic_writer(path) as f:
        # GGUFWriter opens files itself; handing it the atomic writer's file instead (its
        # documented state for an output already open) keeps the write atomic
        writer.fout = [f]
        writer.state = gguf.gguf_writer.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
    return Summary(count, total, vocab.end_of_text)


def refuse_inexpressible(config) -> None:
    if config.position != "learned":
        raise InteropError(f"llama.cpp's gpt2 architecture cannot express position "
                           f"{config.position!r}: it adds a learned position table to the "
                           f"embeddings and has no rotation of queries and keys by the "
                           f"crystalline angles (export it with --to hf instead)")
    if config.attention != "dense":
        raise InteropError(f"llama.cpp's gpt2 architecture cannot express attention "
                           f"{config.attention!r}: it attends to every earlier position and "
                           f"has no mask of Ulam-spiral neighbours (export it with --to hf "
                           f"instead)")


def gguf_tensors(model: Model):
    """(GGUF name, float32 array laid out as llama.cpp reads it) for every tensor. GGUF lists
    dimensions fastest first, so an array of shape (rows, row length) is the ggml tensor
    {row length, rows}: GPT-2's Conv1D weights (in, out) are transposed to (out, in)."""
    p, config = model.params, model.config
    yield "token_embd.weight", p["wte"]
    yield "position_embd.weight", p["wpe"]
    yield "output_norm.weight", p["ln_f.weight"]
    yield "output_norm.bias", p["ln_f.bias"]
    # written even when tied: llama.cpp versions before the optional output tensor need it
    yield "output.weight", p["wte" if config.tie_embeddings else "lm_head.weight"]
    for i in range(config.n_layer):
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"),
                             ("attn.c_proj", "attn_output"), ("ln_2", "ffn_norm"),
                             ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            weight = p[f"h.{i}.{ours}.weight"]
            yield f"blk.{i}.{theirs}.weight", weight if weight.ndim == 1 else weight.T
            yield f"blk.{i}.{theirs}.bias", p[f"h.{i}.{ours}.bias"]


def _encode(gguf, name: str, array: np.ndarray, type: str):
    """The bytes of one tensor in the file's type, and their GGML type."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if type == "f32" or array.ndim == 1 or name == "position_embd.weight":
        return array, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if type == "q8_0" and array.shape[-1] % block == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        return quantized, gguf.GGMLQuantizationType.Q8_0
    largest = float(np.abs(array).max())
    if largest > _F16_MAX:
        raise InteropError(f"tensor {name} holds {largest:g}, beyond float16's range: export "
                           f"it with --type f32")
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def gguf_vocab(tokenizer, vocab_size: int) -> Vocab:
    """The token list, token types and merges of llama.cpp's gpt2 tokenizer for a byte-level
    BPE or a character tokenizer; ids the tokenizer does not use (a model vocabulary larger
    than its tokenizer) become unused [PADn] tokens."""
    import gguf

    data = json.loads(tokenizer.to_str())
    kind = tokenizer_kind(tokenizer)
    if kind == "bpe":
        _require_byte_level(data)
        tokens = dict(data["model"]["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    elif kind == "char":
        chars = tokenizer.get_vocab()
        tokens = {byte_level_spelling(char): i for char, i in chars.items()}
        merges = _character_merges(chars)
    else:
        raise InteropError("the tokenizer is neither a byte-level BPE nor a character "
                           "tokenizer, and llama.cpp's gpt2 models tokenize with GPT-2's "
                           "byte-level BPE")
    added = {}
    for token in data.get("added_tokens") or []:
        tokens[token["content"]] = token["id"]
        added[token["id"]] = gguf.TokenType.CONTROL if token.get("special") \
            else gguf.TokenType.USER_DEFINED
    by_id = {i: token for token, i in tokens.items()}
    if max(by_id) >= vocab_size:
        raise InteropError(f"the tokenizer has token id {max(by_id)} but the model only "
                           f"{vocab_size} rows")
    token_list, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            token_list.append(by_id[i])
            types.append(added.get(i, gguf.TokenType.NORMAL))
        else:
            token_list.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return Vocab(token_list, [int(t) for t in types], merges or [NO_MERGE],
                 end_of_text_id(tokenizer))


def _require_byte_level(data: dict) -> None:
    """GPT-2's byte-level BPE as llama.cpp's gpt2 tokenizer computes it, or a clear refusal."""
    def kind(part):
        return None if part is None else part.get("type")

    pre, model = data.get("pre_tokenizer"), data["model"]
    checks = [
        ("normalizer", data.get("normalizer") is None, kind(data.get("normalizer"))),
        ("pre-tokenizer", kind(pre) == "ByteLevel" and pre.get("use_regex", True)
         and not pre.get("add_prefix_space", False), pre),
        ("decoder", kind(data.get("decoder")) == "ByteLevel", kind(data.get("decoder"))),
        ("post-processor", kind(data.get("post_processor")) in (None, "ByteLevel"),
         kind(data.get("post_processor"))),
        ("BPE model", not model.get("continuing_subword_prefix")
         and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
         and model.get("dropout") is None, {k: model.get(k) for k in (
             "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "dropout")}),
    ]
    for part, ok, found in checks:
        if not ok:
            raise InteropError(f"the tokenizer's {part} ({found}) is not that of GPT-2's "
                               f"byte-level BPE, the only tokenizer of llama.cpp's gpt2 models")


def _character_merges(chars) -> list[str]:
    """Merges that join the UTF-8 bytes of each character of `chars`, left to right."""
    merges: dict[str, None] = {}   # ordered and without repeats (shared leading bytes)
    for char in sorted(chars):
        data = char.encode("utf-8")
        for end in range(2, len(data) + 1):
            merges[f"{byte_level_spelling(data[:end - 1])} "
                   f"{byte_level_spelling(data[end - 1:end])}"] = None
    return list(merges)
