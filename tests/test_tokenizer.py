import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from cllm.errors import DataError
from cllm.tokenizer import (
    _unicode_to_byte, decode, encode, encode_batch, save_tokenizer, split_for_encoding,
    token_display, tokenizer_from_json, tokenizer_to_json, train_bpe, train_char,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Tabs\tand  double  spaces,\r\nWindows line ends,\nand emoji 😀🎉 too.\n",
    "Ünïcödé ßträßé — “quotes” and CJK 漢字かな.\n",
] * 20

# Any Unicode text, with the characters that tokenizers like to mangle drawn more often.
any_text = st.text(st.one_of(st.characters(codec="utf-8"),
                             st.sampled_from("\n\r\t \x00😀👍🏽é\u200b")))


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def char():
    return train_char(CORPUS)


def test_bpe_respects_vocab_size():
    assert train_bpe(CORPUS * 5, 280).get_vocab_size() <= 280


def test_bpe_learns_merges(bpe):
    text = "The quick brown fox"
    assert len(encode(bpe, text)) < len(text.encode("utf-8"))


def test_bpe_rejects_vocab_smaller_than_bytes():
    with pytest.raises(DataError, match="at least 256"):
        train_bpe(CORPUS, 100)


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_bpe_round_trips_any_text(bpe, text):
    assert decode(bpe, encode(bpe, text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(any_text.filter(bool), min_size=1, max_size=4))
def test_char_round_trips_its_training_text(texts):
    tokenizer = train_char(texts)
    for text in texts:
        assert decode(tokenizer, encode(tokenizer, text)) == text


@settings(max_examples=200, deadline=None)
@given(any_text,
       st.integers(1, 8))
def test_split_for_encoding_is_exact_for_byte_level_bpe(bpe, text, piece_chars):
    pieces = split_for_encoding(text, piece_chars)
    assert "".join(pieces) == text
    assert all(pieces) or pieces == [""]
    joined = [i for piece in pieces for i in bpe.encode(piece).ids]
    assert joined == bpe.encode(text).ids


def test_split_for_encoding_cuts_long_text(bpe):
    text = "word " * 10_000
    pieces = split_for_encoding(text, 1000)
    assert 40 < len(pieces) < 60 and "".join(pieces) == text


def test_training_on_pieces_learns_the_same_merges():
    text = "".join(CORPUS)
    assert tokenizer_to_json(train_bpe(split_for_encoding(text, 50), 300)) == \
        tokenizer_to_json(train_bpe([text], 300))


@settings(max_examples=200, deadline=None)
@given(st.lists(any_text, min_size=1, max_size=3))
def test_char_lookup_matches_the_tokenizer_pipeline(char, texts):
    known = ["".join(c for c in text if c in char.get_vocab()) for text in texts]
    ids = encode_batch(char, known, "test")
    assert [a.tolist() for a in ids] == [e.ids for e in char.encode_batch(known)]
    assert all(a.dtype == np.uint32 for a in ids)


def test_char_ids_follow_code_point_order(char):
    vocab = char.get_vocab()
    chars = sorted(set("".join(CORPUS)))
    assert vocab == {c: i for i, c in enumerate(chars)}
    assert "\n" in vocab and "\r" in vocab and "\t" in vocab and "😀" in vocab


def test_char_rejects_unknown_characters(char):
    with pytest.raises(DataError, match=r"prompt contains characters .* lacks: '@', '~'"):
        encode(char, "fox@~")


def test_prompt_with_lone_surrogate_is_a_data_error(bpe):
    with pytest.raises(DataError, match="not valid Unicode"):
        encode(bpe, "abc\udcff")


def test_char_needs_some_text():
    with pytest.raises(DataError, match="no characters"):
        train_char(["", ""])


def test_unknown_characters_in_a_file_name_it(char):
    with pytest.raises(DataError, match=r"^corpus/x\.txt contains .* lacks: '#', '@'$"):
        encode_batch(char, ["ok", "#@#"], "corpus/x.txt")
    many = "".join(chr(0x4000 + i) for i in range(15))
    with pytest.raises(DataError, match="and 5 more"):
        encode(char, many)


@pytest.mark.parametrize("name", ["bpe", "char"])
def test_json_round_trip(name, request):
    tokenizer = request.getfixturevalue(name)
    restored = tokenizer_from_json(tokenizer_to_json(tokenizer))
    text = CORPUS[1]
    assert encode(restored, text) == encode(tokenizer, text)
    assert decode(restored, encode(restored, text)) == text


def test_bad_json_is_a_data_error():
    with pytest.raises(DataError, match="not a valid tokenizers JSON"):
        tokenizer_from_json('{"model": 3')


def test_byte_table_matches_the_byte_level_alphabet():
    table = _unicode_to_byte()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(table.values()) == list(range(256))


def test_save_writes_json_and_readable_vocab(bpe, char, tmp_path):
    save_tokenizer(char, tmp_path)
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == char.get_vocab_size()
    assert lines[:4] == ["\\t", "\\n", "\\r", " "]
    assert "😀" in lines
    assert tokenizer_from_json((tmp_path / "tokenizer.json").read_text()).get_vocab() == \
        char.get_vocab()

    save_tokenizer(bpe, tmp_path)
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == bpe.get_vocab_size()
    # Single bytes: readable when printable ASCII, escaped otherwise, including lone UTF-8 bytes.
    assert lines[bpe.token_to_id("A")] == "A"
    assert lines[bpe.token_to_id("Ċ")] == "\\n"
    assert lines[bpe.token_to_id("Ġ")] == " "
    assert lines[bpe.token_to_id("ð")] == "\\xf0"
    assert lines[bpe.token_to_id("\\")] == "\\\\"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "vocab.txt"]


def test_token_display_of_merged_tokens(bpe):
    ids = encode(bpe, "The quick")
    assert "".join(token_display(bpe, i) for i in ids) == "The quick"
