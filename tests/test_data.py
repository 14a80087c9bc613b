import os
from types import SimpleNamespace

import numpy as np
import pytest

from cllm import data
from cllm.data import (
    build_dataset, find_text_files, iter_texts, iter_windows_sequential, open_dataset,
    sample_windows, split_train_val,
)
from cllm.errors import DataError
from cllm.tokenizer import train_bpe, train_char

TEXT_A = "First file.\r\nWith Windows line ends.\r\n"
TEXT_B = "Second file, no final newline — ünïcödé 😀"


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_bytes(TEXT_B.encode())
    (root / "a.txt").write_bytes(TEXT_A.encode())
    (root / "sub" / "deeper" / "c.md").write_bytes(b"")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "nul.txt").write_bytes(b"text with a \0 byte")
    return root


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([TEXT_A, TEXT_B, "hello world\n" * 50], 300)


def test_find_text_files(corpus):
    files = find_text_files(corpus)
    assert [p.relative_to(corpus).as_posix() for p in files.paths] == \
        ["a.txt", "b.txt", "sub/deeper/c.md"]
    assert files.skipped == 3
    assert files.total_bytes == len(TEXT_A.encode()) + len(TEXT_B.encode())
    assert files.root == corpus


def test_sorted_by_relative_path_not_by_walk_order(tmp_path):
    for name in ["b/x.txt", "a/z.txt", "a.txt", "a/b/y.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("t")
    files = find_text_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files.paths] == \
        ["a.txt", "a/b/y.txt", "a/z.txt", "b/x.txt"]


def test_follows_file_links_but_not_folder_links(corpus, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.txt").write_text("outside")
    os.symlink(outside, corpus / "linked_folder")
    os.symlink(corpus / "a.txt", corpus / "linked_file.txt")
    os.symlink(corpus, corpus / "sub" / "loop")
    names = [p.name for p in find_text_files(corpus).paths]
    assert names == ["a.txt", "b.txt", "linked_file.txt", "c.md"]


def test_multibyte_character_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_READ_BLOCK", 3)
    (tmp_path / "f.txt").write_text("ab😀cd€", encoding="utf-8")
    assert len(find_text_files(tmp_path).paths) == 1


def test_truncated_utf8_at_end_is_not_text(tmp_path):
    (tmp_path / "f.txt").write_bytes("ab😀".encode()[:-1])
    with pytest.raises(DataError, match="none of its 1 files is UTF-8 text"):
        find_text_files(tmp_path)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such corpus folder"),
    (lambda p: p.write_text("x"), "is not a folder"),
    (lambda p: p.mkdir(), "holds no files"),
    (lambda p: (p.mkdir(), (p / "x.bin").write_bytes(b"\0")), "skipped as binary"),
])
def test_corpus_errors(tmp_path, setup, message):
    root = tmp_path / "corpus"
    setup(root)
    with pytest.raises(DataError, match=message) as info:
        find_text_files(root)
    assert str(root) in str(info.value)


def test_iter_texts_keeps_line_ends_and_adds_final_newline(corpus):
    assert list(iter_texts(find_text_files(corpus))) == [TEXT_A, TEXT_B + "\n", ""]


def test_build_and_open_dataset(corpus, bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_ENCODE_BATCH", 1)
    long_text = "hello world\n" * 30_000  # more than one piece
    (corpus / "long.txt").write_text(long_text)
    files = find_text_files(corpus)
    done = []
    path = tmp_path / "dataset.bin"
    count = build_dataset(bpe, files, path, progress=done.append)
    expected = [i for text in [TEXT_A, TEXT_B + "\n", long_text] for i in bpe.encode(text).ids]
    tokens = open_dataset(path, vocab_size=bpe.get_vocab_size())
    assert count == len(expected) and tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    assert sum(done) == files.total_bytes and len(done) > 4
    header = path.read_bytes()[:32]
    assert header[:8] == b"CLLMDATA"
    assert np.frombuffer(header[8:20], "<u4").tolist() == [1, 2, bpe.get_vocab_size()]
    assert np.frombuffer(header[24:32], "<u8")[0] == count
    assert sorted(os.listdir(tmp_path)) == ["corpus", "dataset.bin"]


def test_char_dataset_round_trips_the_corpus(corpus, tmp_path):
    files = find_text_files(corpus)
    tokenizer = train_char(iter_texts(files))
    build_dataset(tokenizer, files, tmp_path / "d.bin")
    tokens = open_dataset(tmp_path / "d.bin")
    assert tokenizer.decode(tokens.tolist()) == TEXT_A + TEXT_B + "\n"


def test_large_vocab_uses_uint32(corpus, tmp_path):
    class Huge:
        """Stands in for a tokenizer: only the vocabulary size and ids matter here."""
        model = None

        def get_vocab_size(self):
            return 70_000

        def encode_batch_fast(self, pieces):
            return [SimpleNamespace(ids=[69_999] * len(p)) for p in pieces]

    files = find_text_files(corpus)
    build_dataset(Huge(), files, tmp_path / "d.bin")
    tokens = open_dataset(tmp_path / "d.bin")
    assert tokens.dtype == np.uint32 and set(tokens.tolist()) == {69_999}


def test_char_tokenizer_meeting_new_characters(corpus, tmp_path):
    tokenizer = train_char(["First file.\n"])
    with pytest.raises(DataError, match=r"a\.txt contains characters .* lacks: '\\r', 'W'"):
        build_dataset(tokenizer, find_text_files(corpus), tmp_path / "d.bin")
    assert sorted(os.listdir(tmp_path)) == ["corpus"]


def test_empty_corpus_text(tmp_path, bpe):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        build_dataset(bpe, find_text_files(tmp_path / "c"), tmp_path / "d.bin")


def test_build_keeps_old_dataset_when_interrupted(corpus, bpe, tmp_path):
    path = tmp_path / "d.bin"
    build_dataset(bpe, find_text_files(corpus), path)
    before = path.read_bytes()

    def interrupt(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(bpe, find_text_files(corpus), path, progress=interrupt)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["corpus", "d.bin"]


@pytest.fixture
def dataset_file(corpus, bpe, tmp_path):
    path = tmp_path / "d.bin"
    build_dataset(bpe, find_text_files(corpus), path)
    return path


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b"", "not a cllm dataset file"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a cllm dataset file"),
    (lambda b: b[:20], "truncated dataset file"),
    (lambda b: b[:-1], r"truncated dataset file: its header promises \d+ tokens"),
    (lambda b: b + b"\0\0", "corrupt dataset file"),
    (lambda b: b[:8] + b"\x07" + b[9:], "version 7 is not supported"),
    (lambda b: b[:12] + b"\x03" + b[13:], "token size 3"),
])
def test_open_dataset_errors(dataset_file, mangle, message):
    dataset_file.write_bytes(mangle(dataset_file.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        open_dataset(dataset_file)
    assert str(dataset_file) in str(info.value)


def test_open_dataset_checks_vocab_and_existence(dataset_file):
    with pytest.raises(DataError, match="vocabulary of 300 tokens but the tokenizer has 500"):
        open_dataset(dataset_file, vocab_size=500)
    with pytest.raises(DataError, match="no such dataset file"):
        open_dataset(dataset_file.with_name("missing.bin"))


def test_split_train_val_views():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = split_train_val(tokens, 0.15)
    assert len(train) == 85 and val.tolist() == list(range(85, 100))
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    assert len(split_train_val(tokens, 0.0)[1]) == 0
    with pytest.raises(DataError, match="validation fraction"):
        split_train_val(tokens, 1.0)


def test_sample_windows():
    tokens = np.arange(50, dtype=np.uint16)
    rng = np.random.default_rng(0)
    x, y = sample_windows(rng, tokens, 64, 10)
    assert x.shape == y.shape == (64, 10) and x.dtype == y.dtype == np.int64
    assert type(x) is type(y) is np.ndarray
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert (y == x + 1).all() and (np.diff(x, axis=1) == 1).all()
    assert x[:, 0].min() == 0 and y[:, -1].max() == 49  # both ends of the stream are reachable
    again = sample_windows(np.random.default_rng(0), tokens, 64, 10)
    assert (again[0] == x).all()
    assert sample_windows(rng, tokens[:11], 2, 10)[0].tolist() == [list(range(10))] * 2


def test_windows_need_one_more_token_than_the_sequence():
    with pytest.raises(DataError, match="validation split too short for one sequence of 10 "
                                        "tokens: it has 10 tokens and needs at least 11"):
        sample_windows(np.random.default_rng(0), np.arange(10), 1, 10, name="validation split")
    with pytest.raises(DataError, match="corpus too short"):
        next(iter_windows_sequential(np.arange(5), 1, 10))


def test_iter_windows_sequential_covers_the_split():
    tokens = np.arange(36, dtype=np.uint32)
    batches = list(iter_windows_sequential(tokens, 3, 5))
    assert [x.shape for x, _ in batches] == [(3, 5), (3, 5), (1, 5)]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.ravel().tolist() == list(range(35)) and y.ravel().tolist() == list(range(1, 36))
    assert all(type(b) is np.ndarray and b.dtype == np.int64 for pair in batches for b in pair)
