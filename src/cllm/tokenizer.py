"""Tokenizers: byte-level BPE or one id per character, both real Hugging Face `tokenizers`
objects so that they serialize to JSON and travel inside the model file."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError
from .fileio import atomic_write_text

# Byte-level BPE starts from one token per byte value, so it can never meet an unknown input.
BYTE_ALPHABET_SIZE = 256

# Character tokenizers need an unk_token name for WordLevel, but it is never in the vocabulary:
# encode_batch refuses unknown characters with a clear error instead of mapping them to a token.
_UNKNOWN_TOKEN = "[UNK]"

# Characters per piece when long texts are cut for the tokenizer (see split_for_encoding):
# whole files of tens of MB cost the Rust side GBs of memory and use only one core.
PIECE_CHARS = 1 << 18

# Cut only between a non-space character and an ASCII whitespace one. No pre-token of the
# GPT-2 byte-level regex spans such a point (letters, digits and punctuation never absorb
# whitespace after them, and the regex looks only ahead), and a piece never ends inside a
# whitespace run, so encoding the pieces separately gives exactly the ids of encoding the whole
# text. The whitespace side is ASCII because Python's \s is wider than the Rust regex's (\x1c).
# For character tokenizers any cut is exact.
_SAFE_CUT = re.compile(r"\S(?=[\t\n\v\f\r ])")


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
    # The pieces pre-tokenize exactly as the whole texts do, so the merges learnt are the same.
    tokenizer.train_from_iterator(_pieces(texts), trainer)
    return tokenizer


def split_for_encoding(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of about `piece_chars` characters at points where encoding the
    pieces separately gives the same ids as encoding the whole (see _SAFE_CUT). A piece grows
    past `piece_chars` when no such point follows; the pieces always join back to `text`."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _SAFE_CUT.search(text, start + piece_chars - 1)
        if cut is None:
            break
        pieces.append(text[start:cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from split_for_encoding(text)


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


def tokenizer_kind(tokenizer: Tokenizer) -> str | None:
    """"bpe" or "char" for the tokenizers these functions train (the values of `cllm train
    --tokenizer`); None for any other kind."""
    if isinstance(tokenizer.model, models.BPE):
        return "bpe"
    if isinstance(tokenizer.model, models.WordLevel) and all(
            len(token) == 1 for token in tokenizer.get_vocab()):
        return "char"
    return None


def encode_batch(tokenizer: Tokenizer, texts: list[str], what: str) -> list[np.ndarray]:
    """The ids of each text as a uint32 array. `what` names the texts' source in the error
    raised when a character tokenizer meets a character it lacks."""
    if isinstance(tokenizer.model, models.WordLevel):
        vocab = tokenizer.get_vocab()
        if all(len(token) == 1 for token in vocab):
            return _encode_chars(vocab, texts, what)
    try:
        encodings = tokenizer.encode_batch_fast(texts)
    except BaseException as e:
        if not _from_rust(e):
            raise
        raise DataError(f"the tokenizer cannot encode {what}: {e}") from e
    return [np.array(e.ids, dtype=np.uint32) for e in encodings]


def _from_rust(e: BaseException) -> bool:
    """An error of the `tokenizers` library: the bare Exception it raises for whatever it
    cannot do, or the PanicException (a BaseException, so that `except Exception` misses it)
    of a Rust panic, which a tokenizer file can provoke."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _encode_chars(vocab: dict[str, int], texts: list[str], what: str) -> list[np.ndarray]:
    """A character tokenizer's ids by table lookup: the same ids as its Rust pipeline (one
    pre-token per character, one WordLevel entry per pre-token) at a small fraction of the cost."""
    chars = sorted(vocab)
    code_points = np.array([ord(char) for char in chars], dtype=np.uint32)
    ids = np.array([vocab[char] for char in chars], dtype=np.uint32)
    encoded = []
    for text in texts:
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        at = np.searchsorted(code_points, points).clip(max=len(chars) - 1)
        known = code_points[at] == points
        if not known.all():
            unknown = [chr(point) for point in np.unique(points[~known])]
            shown = ", ".join(repr(char) for char in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise DataError(f"{what} contains characters the model's vocabulary lacks: "
                            f"{shown}{more}")
        encoded.append(ids[at])
    return encoded


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode a prompt, refusing text the tokenizer cannot represent with a clear DataError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Lone surrogates: Python decodes command-line bytes that are not UTF-8 into these.
        raise DataError(f"prompt is not valid Unicode text: {e.reason} at position {e.start} "
                        "(was it given in an encoding other than UTF-8?)") from e
    try:
        return encode_batch(tokenizer, [text], "the prompt")[0].tolist()
    except DataError:
        raise
    except BaseException as e:
        if not _from_rust(e):
            raise
        raise DataError(f"the model's tokenizer cannot encode the prompt: {e}") from e


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    try:
        return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
    except BaseException as e:
        if not _from_rust(e):
            raise
        raise DataError(f"the model's tokenizer cannot decode its ids: {e}") from e


def tokenizer_to_json(tokenizer: Tokenizer) -> str:
    return tokenizer.to_str()


def tokenizer_from_json(text: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_str(text)
        # cllm encodes whole texts: a truncation or padding saved with the tokenizer would cut
        # or pad them silently (and a hostile one panics, or pads to terabytes)
        tokenizer.no_truncation()
        tokenizer.no_padding()
    except BaseException as e:  # a bare Exception for any malformed input, or a panic
        if not _from_rust(e):
            raise
        raise DataError(f"the stored tokenizer is not a valid tokenizers JSON document: {e}") from e
    return tokenizer


def checked_tokenizer(text: str, vocab_size: int, source: str) -> Tokenizer:
    """The tokenizer stored in `source` for a model of vocab_size tokens, once it is known to
    fit the model and to encode and decode: a sample of its own vocabulary, decoded then
    encoded again."""
    try:
        tokenizer = tokenizer_from_json(text)
    except DataError as e:
        raise DataError(f"{source}: {e}") from e
    size = tokenizer.get_vocab_size()
    if not 1 <= size <= vocab_size:
        raise DataError(f"{source}: the tokenizer has {size} tokens, but the model has room "
                        f"for {vocab_size} (and needs at least one)")
    largest = max(tokenizer.get_vocab().values(), default=0)
    if largest >= vocab_size:
        raise DataError(f"{source}: the tokenizer has a token of id {largest}, but the model "
                        f"has room for ids up to {vocab_size - 1}")
    growth = max(_growth(tokenizer.normalizer) * _growth(tokenizer.pre_tokenizer),
                 _growth(tokenizer.decoder))
    if growth > _MAX_GROWTH:
        raise DataError(f"{source}: the stored tokenizer can make text up to {growth:,} times "
                        f"longer as it encodes or decodes it (its normalizer, pre-tokenizer or "
                        f"decoder), more than the {_MAX_GROWTH} cllm accepts")
    try:
        sample = decode(tokenizer, range(min(size, 64)))[:_SAMPLE_CHARS]
        encode_batch(tokenizer, [sample], "a sample of its own vocabulary")
    except Exception as e:  # DataError: a Rust error or panic, or a character it lacks
        raise DataError(f"{source}: the stored tokenizer cannot encode and decode text: "
                        f"{e}") from e
    return tokenizer


# Characters of the sample a stored tokenizer is tried on.
_SAMPLE_CHARS = 4096
# How many times longer the text out of a normalizer, pre-tokenizer or decoder can be than the
# text into it, at most (in UTF-8 bytes, counted generously): a Sequence multiplies the growth
# of its parts, so that without a bound a tokenizer file of a few hundred bytes (a chain of
# Replace normalizers, or of ByteLevel pre-tokenizers) turns one character into gigabytes.
_MAX_GROWTH = 256
_GROWTH = {"ByteLevel": 2, "Metaspace": 3, "BertNormalizer": 3, "NFC": 3, "NFD": 3, "NFKC": 3,
           "NFKD": 3, "Lowercase": 2, "Precompiled": 16}


def _growth(component) -> int:
    """The growth of a tokenizer component (None, or its `tokenizers` object)."""
    if component is None:
        return 1
    try:
        return _growth_of(json.loads(component.__getstate__()))
    except BaseException as e:
        if not _from_rust(e):
            raise
        return _MAX_GROWTH + 1   # a component that cannot even describe itself


def _growth_of(spec) -> int:
    if not isinstance(spec, dict):
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        growth = 1
        for part in next((spec[key] for key in ("normalizers", "pretokenizers", "decoders")
                          if isinstance(spec.get(key), list)), []):
            growth = min(growth * _growth_of(part), 2 ** 63)
        return growth
    if kind == "Replace":
        content = len(str(spec.get("content", "")).encode("utf-8", "surrogatepass"))
        pattern = spec.get("pattern")
        string = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(string, str) and string:
            return max(1, -(-content // len(string.encode("utf-8", "surrogatepass"))))
        return content + 1   # a regular expression may match (empty) between any two bytes
    return _GROWTH.get(kind, 1)


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
    # added tokens (GPT-2's <|endoftext|>) are plain text, not spelled in byte-level characters
    if isinstance(tokenizer.decoder, decoders.ByteLevel) \
            and token_id not in tokenizer.get_added_tokens_decoder():
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


def byte_level_spelling(text: str | bytes) -> str:
    """Text (as its UTF-8) or bytes as byte-level BPE spells them: each byte by its GPT-2
    character."""
    to_char = _byte_to_unicode()
    data = text.encode("utf-8") if isinstance(text, str) else text
    return "".join(to_char[b] for b in data)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    return {b: char for char, b in _unicode_to_byte().items()}


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
