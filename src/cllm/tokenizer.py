"""Tokenizers: byte-level BPE or one id per character, both real Hugging Face `tokenizers`
objects so that they serialize to JSON and travel inside the model file."""
from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError
from .fileio import atomic_write_text

# Byte-level BPE starts from one token per byte value, so it can never meet an unknown input.
BYTE_ALPHABET_SIZE = 256

# Character tokenizers need an unk_token name for WordLevel, but it is never in the vocabulary:
# `encode` refuses unknown characters with a clear error instead of mapping them to a token.
_UNKNOWN_TOKEN = "[UNK]"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with at most `vocab_size` tokens."""
    if vocab_size < BYTE_ALPHABET_SIZE:
        raise DataError(f"a byte-level BPE vocabulary needs at least {BYTE_ALPHABET_SIZE} tokens "
                        f"(one per byte value), but the vocabulary size asked for is {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_char(texts: Iterable[str]) -> Tokenizer:
    """One id per distinct character of the corpus, in code point order."""
    chars = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise DataError("the corpus holds no characters to build a character vocabulary from")
    vocab = {char: i for i, char in enumerate(sorted(chars))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=_UNKNOWN_TOKEN))
    # [\s\S] rather than "." so that newlines and carriage returns are characters like any other.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def is_char_tokenizer(tokenizer: Tokenizer) -> bool:
    return isinstance(tokenizer.model, models.WordLevel)


def check_known_characters(tokenizer: Tokenizer, text: str, what: str) -> None:
    """Raise DataError naming `what` if a character tokenizer lacks some character of `text`."""
    if not is_char_tokenizer(tokenizer):
        return
    unknown = sorted(set(text).difference(tokenizer.get_vocab()))
    if unknown:
        shown = ", ".join(repr(char) for char in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(f"{what} contains characters the model's vocabulary lacks: {shown}{more}")


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode a prompt, refusing text the tokenizer cannot represent with a clear DataError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Lone surrogates: Python decodes command-line bytes that are not UTF-8 into these.
        raise DataError(f"prompt is not valid Unicode text: {e.reason} at position {e.start} "
                        "(was it given in an encoding other than UTF-8?)") from e
    check_known_characters(tokenizer, text, "prompt")
    return tokenizer.encode(text).ids


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    return tokenizer.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception for any malformed input
        raise DataError(f"the stored tokenizer is not a valid tokenizers JSON document: {e}") from e


def save_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike) -> None:
    """Write `tokenizer.json` and a human-readable `vocab.txt` (one token per line, by id)."""
    folder = Path(folder)
    atomic_write_text(folder / "tokenizer.json", tokenizer_to_json(tokenizer))
    lines = [token_display(tokenizer, i) for i in range(tokenizer.get_vocab_size())]
    atomic_write_text(folder / "vocab.txt", "".join(line + "\n" for line in lines))


def token_display(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token on one line: byte-level tokens as the bytes they stand for,
    with newlines, tabs, other non-printables and bytes that are not whole UTF-8 characters
    escaped as Python would (\\n, \\t, \\x00, \\xf0), but without quotes."""
    token = tokenizer.id_to_token(token_id)
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        raw = bytes(_unicode_to_byte()[char] for char in token)
        # surrogateescape keeps each stray byte distinguishable, so _escape can show it as \xNN.
        token = raw.decode("utf-8", errors="surrogateescape")
    return _escape(token)


def _escape(text: str) -> str:
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\" or not char.isprintable():
            out.append(repr(char)[1:-1])
        else:
            out.append(char)
    return "".join(out)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Invert GPT-2's byte-to-character table, which byte-level BPE tokens are spelled in:
    printable Latin-1 bytes stand for themselves, the other bytes for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(BYTE_ALPHABET_SIZE) if b not in set(printable)]
    table.update({chr(BYTE_ALPHABET_SIZE + i): b for i, b in enumerate(others)})
    return table
