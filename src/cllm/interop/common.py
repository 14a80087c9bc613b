"""What import and export share: the error they raise, bounded JSON reading, and the tensor
names of Hugging Face GPT-2."""
from __future__ import annotations

import os
from pathlib import Path

from .. import safejson
from ..errors import CllmError

# The tensor types of `cllm export --to gguf`.
GGUF_TYPES = ("f32", "f16", "q8_0")
# The end-of-text token of GPT-2's vocabulary, the one special token its tokenizer files name.
END_OF_TEXT = "<|endoftext|>"


class InteropError(CllmError):
    """A model folder or file from elsewhere that cllm cannot read, or a model that the
    requested format cannot express."""


def read_json(path: Path, limit: int, what: str):
    """The JSON value of a file from an untrusted source, refused when larger than `limit`
    bytes (before reading it) or not valid JSON."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise InteropError(f"{path}: no such file") from None
    if size > limit:
        raise InteropError(f"{path}: {size:,} bytes is too large for {what} (at most "
                           f"{limit:,})")
    try:
        return safejson.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise InteropError(f"{path}: not valid JSON ({what}): {e}") from e


def read_text(path: Path, limit: int, what: str) -> str:
    size = os.stat(path).st_size
    if size > limit:
        raise InteropError(f"{path}: {size:,} bytes is too large for {what} (at most "
                           f"{limit:,})")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InteropError(f"{path}: not UTF-8 text ({what}): {e}") from e


def end_of_text_id(tokenizer) -> int | None:
    """The id of GPT-2's end-of-text token when the tokenizer has it (imported GPT-2
    tokenizers do; the tokenizers cllm trains have no special token)."""
    return tokenizer.token_to_id(END_OF_TEXT) if tokenizer is not None else None


def hf_name(name: str) -> str:
    """A cllm tensor name (ModelConfig.tensor_shapes) -> its name in a GPT2LMHeadModel as
    transformers saves it."""
    if name == "lm_head.weight":
        return name
    if name in ("wte", "wpe"):
        return f"transformer.{name}.weight"
    return f"transformer.{name}"


def cllm_name(name: str) -> str:
    """A GPT-2 tensor name with or without the `transformer.` prefix (GPT2LMHeadModel or
    GPT2Model) -> the cllm name."""
    if name == "lm_head.weight":
        return name
    name = name.removeprefix("transformer.")
    return {"wte.weight": "wte", "wpe.weight": "wpe"}.get(name, name)
