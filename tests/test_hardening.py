"""Issue 12, "Nothing a file, a signal or a second run can do loses work or takes the machine
down": one regression test for each reproduction of the issue.

The hostile files are written here, by rewriting the JSON header of files cllm wrote (the
format: 8-byte little-endian header length, JSON header with `__metadata__` of string values,
tensor data). `sealed` edits give the file a fresh digest, computed here from its description
in checkpoint.py, so that the check behind the digest is the one that must refuse it."""
import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from tokenizers import Tokenizer, models, pre_tokenizers

from cli_helpers import (STEPS, TINY, assert_clean_error, door, metric_lines, run_cli,
                         subprocess_env)
from cllm import fileio, safejson
from cllm.checkpoint import load_cllm
from cllm.config import ModelConfig
from cllm.errors import CheckpointError, CllmError, NonFiniteError
from cllm.model import Model
from cllm.optim import AdamW, Schedule, train_step
from cllm.resume import load_checkpoint
from cllm.runlock import LOCK_FILE
from cllm.tokenizer import train_char
from cllm.train import _SAME_REQUEST_SECONDS

DIGEST_MISMATCH = ("damaged or altered .cllm file (its configuration, metadata or tensor "
                   "list does not match its digest)")
DATA_MISMATCH = "damaged or altered .cllm file (its tensor data does not match its digest)"


@pytest.fixture(scope="module")
def full_run(trained_run):
    """The folder of an uninterrupted run of STEPS steps with checkpoints at 3, 6 and 9."""
    return trained_run[0]


# ---- writing hostile files -----------------------------------------------------------------

def parts(path) -> tuple[dict, bytes]:
    data = Path(path).read_bytes()
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + length]), data[8 + length:]


def write(path, header: dict, data: bytes, raw: dict | None = None) -> None:
    """Write a .cllm file; `raw` maps string values of the header to JSON text put in as it
    is (nesting thousands deep, 5000-digit numbers)."""
    text = json.dumps(header, separators=(",", ":"))
    for marker, replacement in (raw or {}).items():
        text = text.replace(json.dumps(marker), replacement)
    encoded = text.encode()
    encoded += b" " * (-len(encoded) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def seal(header: dict, data: bytes) -> None:
    """The digest save_cllm writes: sha256 of the tensor data, and of the header without the
    digest entry as canonical JSON."""
    metadata = {k: v for k, v in header["__metadata__"].items() if k != "digest"}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True,
                           separators=(",", ":"))
    header["__metadata__"]["digest"] = json.dumps({
        "algorithm": "sha256", "tensors": hashlib.sha256(data).hexdigest(),
        "header": hashlib.sha256(canonical.encode()).hexdigest()})


def rewrite(path, change, sealed: bool = True, raw: dict | None = None) -> Path:
    """Edit the header of the file at `path` in place: change(header, data) may edit the
    header and return new tensor data (or None to keep it)."""
    header, data = parts(path)
    data = change(header, data) or data
    if sealed:
        seal(header, data)
    write(path, header, data, raw)
    return Path(path)


def set_json(key: str, **fields):
    """A change setting fields of a metadata JSON object (config, training)."""
    def change(header, data):
        value = json.loads(header["__metadata__"][key])
        value.update(fields)
        header["__metadata__"][key] = json.dumps(value)
    return change


def copied(path, folder: Path, name: str | None = None) -> Path:
    return Path(shutil.copy(path, folder / (name or Path(path).name)))


def error_line(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    return assert_clean_error(code, err, 1)


def assert_same_run(a: Path, b: Path, from_step: int) -> None:
    """Bit for bit the same final model and the same metrics after `from_step`."""
    fa = safetensors.numpy.load_file(a / "final_model.cllm")
    fb = safetensors.numpy.load_file(b / "final_model.cllm")
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].tobytes() == fb[key].tobytes(), key
    assert metric_lines(a / "metrics.jsonl", from_step) == \
        metric_lines(b / "metrics.jsonl", from_step)


# ---- 1: configurations that ask for absurd tables, refused before they are built ---------

@pytest.mark.parametrize("fields, message", [
    (dict(n_ctx=2 ** 31), "invalid model configuration: n_ctx must be at most 1048576, "
                          "got 2147483648"),
    (dict(ulam_radius=1000), "invalid model configuration: ulam_radius must be at most 64, "
                             "got 1000"),
    (dict(n_ctx=10 ** 7), "invalid model configuration: n_ctx must be at most 1048576, "
                          "got 10000000"),
    (dict(n_layer=10 ** 6), "invalid model configuration: n_layer must be at most 1024, "
                            "got 1000000"),
    (dict(n_layer=1024), "damaged .cllm file (its configuration has 1024 layers, 12288 layer "
                         "tensors, but the file holds 15 tensors)"),
    (dict(n_ctx=2 ** 20, ulam_radius=64), "implausible configuration (context 1048576 and "
                                          "Ulam radius 64 ask for tables of "),
], ids=["n_ctx 2^31", "ulam_radius 1000", "n_ctx 10^7", "n_layer 10^6", "n_layer 1024",
        "n_ctx 2^20 radius 64"])
def test_implausible_configuration_is_refused_fast(fields, message, full_run, tmp_path,
                                                    capsys):
    path = rewrite(copied(full_run / "final_model.cllm", tmp_path), set_json("config", **fields))
    assert load_cllm(full_run / "final_model.cllm").config.position == "angular"  # no wpe
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_cllm(path)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 0.25 and peak < 16 << 20, (seconds, peak)
    assert str(info.value).startswith(f"{path}: {message}")
    assert error_line(capsys, "infer", "-m", path, "-p", "x", "-n", 2) == f"error: {info.value}"


def test_generation_cache_is_bounded_by_the_file(tmp_path, capsys):
    """1024 layers of width 2 make a file of 1 MB; a context of 52000 would then ask for a
    key/value cache of 850 MB at the first generated token (and a 10 MB file for 20 GB)."""
    def narrow(n_ctx):
        config = ModelConfig(vocab_size=2, n_ctx=n_ctx, n_embd=2, n_layer=1024, n_head=1,
                             n_inner=1, attention="dense")
        path = tmp_path / f"narrow_{n_ctx}.cllm"
        Model.create(config, seed=0, tokenizer=train_char(["xy"])).save(path)
        return path
    path = narrow(52000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_cllm(path)
    assert time.perf_counter() - start < 1
    assert str(info.value) == (
        f"{path}: implausible configuration (1024 layers of width 2 and context 52000 ask for a "
        f"generation cache of 212,992,000 entries, more than the 19,333,632 a file of 39,944 "
        f"parameters may ask for)")
    code, out, err = run_cli(capsys, "infer", "-m", narrow(4000), "-p", "x", "-n", 2,
                             "--threads", 1)
    assert code == 0 and err == "" and len(out) == 4


# ---- 2: hostile JSON, tokenizers and settings --------------------------------------------

DEEP = "[" * 5000 + "]" * 5000
DIGITS = "9" * 5000


def _deep_header(header, data):
    header["x"] = "@DEEP@"


def _digits_in_header(header, data):
    header["wte"]["data_offsets"][1] = "@DIGITS@"


def _metadata_text(key, text):
    def change(header, data):
        header["__metadata__"][key] = text
    return change


@pytest.mark.parametrize("name, change, sealed, message", [
    ("header nested 5000 deep", _deep_header, False,
     "not a .cllm file, or a damaged one (its header is not valid JSON: nested more than 64 "
     "levels deep)"),
    ("config nested 5000 deep", _metadata_text("config", '{"n_ctx": ' + DEEP + "}"), True,
     "invalid model configuration: nested more than 64 levels deep"),
    ("training nested 5000 deep", _metadata_text("training", DEEP), True,
     "invalid training state: nested more than 64 levels deep"),
    ("5000-digit integer in the header", _digits_in_header, False,
     "not a .cllm file, or a damaged one (its header is not valid JSON: an integer of 5000 "
     "digits (at most 40))"),
    ("5000-digit integer in the config", _metadata_text("config", '{"n_ctx": ' + DIGITS + "}"),
     True, "invalid model configuration: an integer of 5000 digits (at most 40)"),
    ("tokenizer nested 5000 deep", None, True,
     "the stored tokenizer is not a valid tokenizers JSON document: recursion limit exceeded"),
], ids=["header nested", "config nested", "training nested", "5000 digits in the header",
        "5000 digits in the config", "tokenizer nested"])
def test_hostile_json_is_refused_naming_the_file(name, change, sealed, message, full_run,
                                                 tmp_path, capsys):
    path = copied(full_run / "checkpoint_step_3.cllm", tmp_path)
    if change is None:
        def change(header, data):
            tokenizer = header["__metadata__"]["tokenizer"]
            header["__metadata__"]["tokenizer"] = tokenizer.replace('"normalizer":null',
                                                                    '"normalizer":' + DEEP)
    rewrite(path, change, sealed, raw={"@DEEP@": DEEP, "@DIGITS@": DIGITS})
    start = time.perf_counter()
    line = error_line(capsys, "infer", "-m", path, "-p", "x", "-n", 2)
    assert time.perf_counter() - start < 1
    assert line.startswith(f"error: {path}: {message}"), line


def test_safejson_bounds():
    start = time.perf_counter()
    for text in ["[" * 10 ** 6, '{"a":' * 10 ** 5, "1" * 5000, "-" + "1" * 41, "NaN",
                 '{"x": -Infinity}', "[" * 65 + "]" * 65]:
        with pytest.raises(ValueError):
            safejson.loads(text)
    assert time.perf_counter() - start < 1
    # brackets inside strings are text, and 64 levels are fine
    assert safejson.loads(json.dumps(["[{" * 10 ** 4])) == ["[{" * 10 ** 4]
    assert safejson.loads("[" * 64 + "]" * 64) is not None
    assert safejson.loads(str(2 ** 128)) == 2 ** 128


def _word_model(path: Path, tokenizer: Tokenizer, vocab_size: int | None = None) -> Path:
    config = ModelConfig(vocab_size=vocab_size or max(tokenizer.get_vocab_size(), 1), n_ctx=8,
                         n_embd=8, n_layer=1, n_head=2)
    Model.create(config, seed=0, tokenizer=tokenizer).save(path)
    return path


def _words() -> Tokenizer:
    """A WordLevel tokenizer whose [UNK] is not in its vocabulary: tokenizers accepts it, and
    fails on the first word it does not know."""
    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "the": 2},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_tokenizer_that_cannot_encode_the_prompt(tmp_path, capsys, monkeypatch):
    path = _word_model(tmp_path / "words.cllm", _words())
    code, out, err = run_cli(capsys, "infer", "-m", path, "-p", "hello world", "-n", 2,
                             "--threads", 1)
    assert code == 0 and err == "" and out.startswith("hello world")
    expected = ("error: the tokenizer cannot encode the prompt: WordLevel error: Missing [UNK] "
                "token from the vocabulary")
    assert error_line(capsys, "infer", "-m", path, "-p", "hello there", "-n", 2) == expected
    # interactively, the prompt is lost, not the session
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhello world\n"))
    code, out, err = run_cli(capsys, "infer", "-m", path, "-i", "-n", 2, "--threads", 1)
    assert code == 0 and err == expected + "\n" and out.count("\n") == 1


def _tokenizer_json(text_change):
    def change(header, data):
        tokenizer = json.loads(header["__metadata__"]["tokenizer"])
        text_change(tokenizer)
        header["__metadata__"]["tokenizer"] = json.dumps(tokenizer)
    return change


def _empty(tokenizer):
    tokenizer["model"]["vocab"] = {}


def _more_tokens(tokenizer):
    tokenizer["model"]["vocab"].update({f"w{i}": 3 + i for i in range(10)})


def _large_id(tokenizer):
    tokenizer["model"]["vocab"]["the"] = 40


def _growth(tokenizer):
    tokenizer["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "e"}, "content": "e" * 100}] * 5}


@pytest.mark.parametrize("change, message", [
    (_empty, "the tokenizer has 0 tokens, but the model has room for 8 (and needs at least "
             "one)"),
    (_more_tokens, "the tokenizer has 13 tokens, but the model has room for 8 (and needs at "
                   "least one)"),
    (_large_id, "the tokenizer has a token of id 40, but the model has room for ids up to 7"),
    (_growth, "the stored tokenizer can make text up to 10,000,000,000 times longer as it "
              "encodes or decodes it (its normalizer, pre-tokenizer or decoder), more than the "
              "256 cllm accepts"),
], ids=["empty vocabulary", "more tokens than vocab_size", "id beyond vocab_size",
        "normalizers that multiply the text"])
def test_stored_tokenizer_is_checked_on_load(change, message, tmp_path, capsys):
    path = _word_model(tmp_path / "m.cllm", _words(), vocab_size=8)
    rewrite(path, _tokenizer_json(change))
    assert error_line(capsys, "infer", "-m", path, "-p", "hello", "-n", 2) == \
        f"error: {path}: {message}"


def test_stored_truncation_and_padding_are_dropped(tmp_path, capsys):
    """A truncation whose stride is not below its length panics in Rust (a BaseException);
    padding to 2^40 tokens asks for terabytes: cllm encodes whole texts and uses neither."""
    path = _word_model(tmp_path / "m.cllm", _words())

    def change(tokenizer):
        tokenizer["truncation"] = {"max_length": 1, "stride": 5, "strategy": "LongestFirst",
                                   "direction": "Right"}
        tokenizer["padding"] = {"strategy": {"Fixed": 2 ** 40}, "direction": "Right",
                                "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
                                "pad_token": "the"}
    rewrite(path, _tokenizer_json(change))
    code, out, err = run_cli(capsys, "infer", "-m", path, "-p", "hello world the", "-n", 2,
                             "--threads", 1)
    assert code == 0 and err == "" and out.startswith("hello world the")
    assert Model.load(path).tokenizer.encode("hello world the").ids == [0, 1, 2]


def test_checkpoint_setting_of_the_wrong_type(full_run, corpus, tmp_path, capsys):
    path = copied(full_run / "checkpoint_step_3.cllm", tmp_path)

    def change(header, data):
        training = json.loads(header["__metadata__"]["training"])
        training["settings"]["lr"] = "x"
        header["__metadata__"]["training"] = json.dumps(training)
    rewrite(path, change)
    before = path.read_bytes()
    line = error_line(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume", "-t", 1)
    assert line == (f"error: cannot resume: {path}: damaged training state (ValueError: the "
                    f"saved setting lr = 'x' is not a value --lr accepts)")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_3.cllm"]


# ---- 3 and 4: --resume falls back past a newest checkpoint that fails in any way ----------

def _training(**fields):
    def change(header, data):
        training = json.loads(header["__metadata__"]["training"])
        for key, value in fields.items():
            target = training
            *outer, last = key.split(".")
            for part in outer:
                target = target[part]
            target[last] = value
        header["__metadata__"]["training"] = json.dumps(training)
    return change


def _nan_in(tensor: str):
    def change(header, data):
        at = header[tensor]["data_offsets"][0] + 4 * 5
        return data[:at] + struct.pack("<f", float("nan")) + data[at + 4:]
    return change


def _bigger_tokenizer(header, data):
    tokenizer = json.loads(header["__metadata__"]["tokenizer"])
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}": len(vocab) + i for i in range(3)})
    header["__metadata__"]["tokenizer"] = json.dumps(tokenizer)


@pytest.mark.parametrize("change, sealed, message", [
    (_training(**{"settings.lr": "x"}), True,
     "damaged training state (ValueError: the saved setting lr = 'x' is not a value --lr "
     "accepts)"),
    (_metadata_text("config", '{"n_ctx": ' + DEEP + "}"), True,
     "invalid model configuration: nested more than 64 levels deep"),
    (_digits_in_header, False, "an integer of 5000 digits (at most 40)"),
    (set_json("config", n_ctx=2 ** 31), True, "n_ctx must be at most 1048576"),
    (set_json("config", n_head=4), False, DIGEST_MISMATCH),
    (_nan_in("h.0.attn.c_attn.weight"), False, DATA_MISMATCH),
    (_nan_in("optim.v.wte"), True, "the weights or the optimizer state hold values that are "
                                   "not finite (NaN or infinity)"),
    (_bigger_tokenizer, True, "tokens, but the model has room for"),
    (_training(**{"rng.state.state": -1}), True, "damaged training state (OverflowError: "),
], ids=["lr x", "config nested", "5000 digits", "n_ctx 2^31", "n_head edited", "NaN",
        "NaN resealed", "tokenizer larger than the model", "rng state negative"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(change, sealed, message, full_run,
                                                            corpus, tmp_path, capsys):
    copied(full_run / "checkpoint_step_3.cllm", tmp_path)
    newest = rewrite(copied(full_run / "checkpoint_step_6.cllm", tmp_path), change, sealed,
                     raw={"@DEEP@": DEEP, "@DIGITS@": DIGITS})
    with pytest.raises(CllmError) as info:
        load_checkpoint(newest)
    assert message in str(info.value)
    code, out, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume", "-t", 1)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: skipping a damaged checkpoint: {info.value}"]
    assert f"resuming from {tmp_path / 'checkpoint_step_3.cllm'} at step 3" in out
    assert_same_run(full_run, tmp_path, from_step=3)


# ---- 4: the digest, and non-finite numbers ------------------------------------------------

def test_edited_n_head_is_refused_by_the_digest(full_run, tmp_path, capsys):
    path = rewrite(copied(full_run / "final_model.cllm", tmp_path), set_json("config", n_head=4),
                   sealed=False)
    assert error_line(capsys, "infer", "-m", path, "-p", "x", "-n", 2) == \
        f"error: {path}: {DIGEST_MISMATCH}"
    # without a digest (a file of cllm 0.1) the same edit cannot be seen: it loads, with a notice
    def strip(header, data):
        del header["__metadata__"]["digest"]
    rewrite(path, strip, sealed=False)
    code, _, err = run_cli(capsys, "infer", "-m", path, "-p", "x", "-n", 2, "--threads", 1)
    assert code == 0 and err.startswith(f"notice: {path} has no integrity digest")


def test_nan_in_checkpoint_data_is_refused(full_run, tmp_path):
    path = rewrite(copied(full_run / "checkpoint_step_9.cllm", tmp_path), _nan_in("wte"),
                   sealed=False)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {DATA_MISMATCH}")):
        load_cllm(path)


def test_nan_weights_without_a_digest_are_refused_by_infer(full_run, tmp_path, capsys):
    def nan_and_no_digest(header, data):
        del header["__metadata__"]["digest"]
        return _nan_in("wte")(header, data)
    path = rewrite(copied(full_run / "final_model.cllm", tmp_path), nan_and_no_digest,
                   sealed=False)
    code, _, err = run_cli(capsys, "infer", "-m", path, "-p", "x", "-n", 2)
    lines = err.splitlines()
    assert code == 1 and len(lines) == 2 and lines[0].startswith("notice: ")
    assert lines[1] == (f"error: {path}: damaged model file (its weights hold values that are "
                        f"not finite, NaN or infinity)")


def test_non_finite_loss_stops_training_and_keeps_every_checkpoint(corpus, tmp_path, capsys):
    # a learning rate of 1e5 overflows the weights within a few steps
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *TINY,
                           "--tokenizer", "char", "--max-steps", 12, "--checkpoint-every", 1,
                           "--keep-checkpoints", 2, "--eval-every", 0, "-r", "1e5")
    line = assert_clean_error(code, err, 1)
    match = re.fullmatch(r"error: step (\d+): the training loss is \S+ and the gradient norm "
                         r"\S+; the weights were left as they were after step (\d+)", line)
    assert match, line
    step = int(match.group(1))
    assert 3 <= step <= 12 and int(match.group(2)) == step - 1
    # the two newest checkpoints of the steps that were finite: none written, none pruned
    names = sorted(p.name for p in tmp_path.glob("*.cllm"))
    assert names == sorted([f"checkpoint_step_{step - 2}.cllm",
                            f"checkpoint_step_{step - 1}.cllm"])
    assert not list(tmp_path.glob(".*.tmp"))
    for name in names:
        assert load_checkpoint(tmp_path / name).state.step in (step - 2, step - 1)
    assert [r["step"] for r in metric_lines(tmp_path / "metrics.jsonl")] == \
        list(range(1, step))


def test_train_step_leaves_the_weights_on_a_non_finite_loss(monkeypatch):
    config = ModelConfig(vocab_size=10, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = Model.create(config, seed=0)
    optimizer = AdamW(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = np.arange(16).reshape(2, 8) % 10
    schedule = Schedule(1e-3, 1e-4, 0, 10)
    train_step(model, optimizer, schedule, x, x, 1.0, 2, 1)
    before = [a.copy() for a in (model.flat, optimizer.m, optimizer.v)]
    real = Model.loss_and_grads

    def nan_loss(self, *args, **kwargs):
        losses, grads = real(self, *args, **kwargs)
        return losses._replace(loss=float("nan")), grads
    monkeypatch.setattr(Model, "loss_and_grads", nan_loss)
    with pytest.raises(NonFiniteError, match=r"^step 2: the training loss is nan"):
        train_step(model, optimizer, schedule, x, x, 1.0, 2, 1)
    assert optimizer.step_count == 1
    for old, new in zip(before, (model.flat, optimizer.m, optimizer.v)):
        assert old.tobytes() == new.tobytes()


def test_save_refuses_non_finite_tensors(tmp_path):
    config = ModelConfig(vocab_size=10, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    model = Model.create(config, seed=0)
    model.save(tmp_path / "m.cllm")
    before = (tmp_path / "m.cllm").read_bytes()
    model.params["ln_f.bias"][3] = np.inf
    with pytest.raises(NonFiniteError, match="tensor ln_f.bias holds values that are not finite"):
        model.save(tmp_path / "m.cllm")
    assert (tmp_path / "m.cllm").read_bytes() == before
    assert os.listdir(tmp_path) == ["m.cllm"]


# ---- 5 and 7: one run per folder; SIGTERM checkpoints; a second signal stops at once -----

LONG = [*TINY, "--tokenizer", "char", "--checkpoint-every", 1000, "--eval-every", 1]


def _start(corpus, out, *flags) -> subprocess.Popen:
    return subprocess.Popen(
        door("module") + ["train", "-d", str(corpus), "-c", str(out), *map(str, LONG),
                          *map(str, flags)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(process, out: Path, steps: int) -> None:
    """Until the run has logged `steps` training steps (each logs a step and a validation
    line)."""
    deadline = time.monotonic() + 90
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        if path.exists() and path.read_text().count('"loss"') >= steps:
            return
        time.sleep(0.02)
    raise AssertionError("training did not start")


def _communicate(process, timeout=90):
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture
def reaped():
    """Processes a test starts, killed if it fails before they end."""
    processes = []
    yield processes.append
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_one_run_per_folder_and_sigterm_checkpoints(corpus, tmp_path, capsys, reaped):
    flags = ["--max-steps", 30, "--eval-batches", 60]
    out = tmp_path / "stopped"
    process = _start(corpus, out, *flags)
    reaped(process)
    _wait_for_steps(process, out, 2)
    assert (out / LOCK_FILE).read_text() == f"{process.pid}\n"
    # a second run on the folder is refused at once, whatever it asks for
    for extra in (["--resume"], []):
        start = time.perf_counter()
        line = error_line(capsys, "train", "-d", corpus, "-c", out, *LONG, *flags, *extra)
        assert line == (f"error: {out} is in use by another cllm train (PID {process.pid}): "
                        f"wait for it to end, or give another folder with -c")
        assert time.perf_counter() - start < 2
    process.send_signal(signal.SIGTERM)
    stdout, stderr = _communicate(process)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    last = max(r["step"] for r in metric_lines(out / "metrics.jsonl"))
    checkpoint = out / f"checkpoint_step_{last}.cllm"
    assert f"stopped by SIGTERM: step {last} saved to {checkpoint}; continue with --resume" \
        in stdout
    assert last < 30 and load_checkpoint(checkpoint).state.step == last
    assert not (out / LOCK_FILE).exists()
    # --resume continues it: the same run as one never stopped, bit for bit
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", out, "--resume", "-t", 1)
    assert code == 0, err
    whole = tmp_path / "whole"
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", whole, *LONG, *flags)
    assert code == 0, err
    assert_same_run(whole, out, from_step=0)


def test_second_signal_stops_at_once(corpus, tmp_path, reaped):
    # slow steps (30000 validation batches, seconds each): both signals land inside one
    process = _start(corpus, tmp_path, "--max-steps", 1000, "--eval-batches", 30000)
    reaped(process)
    _wait_for_steps(process, tmp_path, 1)
    process.send_signal(signal.SIGTERM)
    # a copy within _SAME_REQUEST_SECONDS is the same request (mpiexec forwards signals)
    time.sleep(_SAME_REQUEST_SECONDS + 0.5)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, _ = _communicate(process)
    # ended by the signal itself, at once rather than after the step in progress
    assert process.returncode == -signal.SIGTERM
    assert time.monotonic() - sent < 2 and "saved to" not in stdout
    # what was written before stays whole
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() > 0
    assert [r["step"] for r in metric_lines(tmp_path / "metrics.jsonl")] == [1]
    assert not list(tmp_path.glob("*.cllm"))


def test_stale_lock_file_is_taken_over(corpus, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    assert gone.wait(timeout=60) == 0
    (tmp_path / LOCK_FILE).write_text(f"{gone.pid}\n")
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *TINY,
                           "--tokenizer", "char", "--max-steps", 2, "--eval-every", 0)
    assert code == 0, err
    assert (tmp_path / "final_model.cllm").exists() and not (tmp_path / LOCK_FILE).exists()


# ---- 6: the corpus a checkpoint was trained on ---------------------------------------------

def test_resume_on_changed_data(full_run, corpus, tmp_path, capsys):
    data = Path(shutil.copytree(corpus, tmp_path / "data"))
    (data / "new.txt").write_text("a file added after the run began\n" * 20)
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = copied(full_run / "checkpoint_step_6.cllm", out)
    before = checkpoint.read_bytes()
    line = error_line(capsys, "train", "-d", data, "-c", out, "--resume", "-t", 1)
    assert line == (f"error: {data} differs from the corpus checkpoint_step_6.cllm was trained "
                    f"on: 1 file added (new.txt). Resuming would not continue the same run; "
                    f"give --accept-changed-data to train on the new data anyway")
    assert checkpoint.read_bytes() == before
    assert [p.name for p in out.glob("*.cllm")] == ["checkpoint_step_6.cllm"]
    code, stdout, err = run_cli(capsys, "train", "-d", data, "-c", out, "--resume", "-t", 1,
                                "--accept-changed-data")
    assert code == 0, err
    assert "continuing on changed data (1 file added (new.txt))" in stdout
    assert load_checkpoint(out / "checkpoint_step_9.cllm").state.step == STEPS


# ---- 8: damaged bytes in inputs, and full disks ------------------------------------------

def test_damaged_metrics_lines_do_not_block_resume(full_run, corpus, tmp_path, capsys):
    copied(full_run / "checkpoint_step_3.cllm", tmp_path)
    lines = (full_run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    damaged = [lines[0], b'{"step": 1, "loss": \xff\xfe}\n', *lines[1:4],
               b"[" * 100_000 + b"\n", b'{"step": ' + b"7" * 5000 + b"}\n", *lines[4:6],
               b'{"step": 5, "lo\xffss": 1}\n']
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(damaged))
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume", "-t", 1)
    assert code == 0, err
    assert_same_run(full_run, tmp_path, from_step=0)


def _interactive(capsys, monkeypatch, model, stdin: bytes, transcript: Path):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return run_cli(capsys, "infer", "-m", model, "-i", "-n", 4, "--seed", 1, "--threads", 1,
                   "-o", transcript)


def test_interactive_invalid_utf8_line_loses_only_that_line(full_run, tmp_path, capsys,
                                                            monkeypatch):
    model = full_run / "final_model.cllm"
    code, out, err = _interactive(capsys, monkeypatch, model,
                                  b"the cat\n\xff\xfe bad\nseven red\n", tmp_path / "a.txt")
    assert code == 0
    assert err == ("error: the input line is not UTF-8 text (invalid start byte at byte 0); "
                   "it was skipped\n")
    code, expected_out, expected_err = _interactive(
        capsys, monkeypatch, model, b"the cat\nseven red\n", tmp_path / "b.txt")
    assert code == 0 and expected_err == ""
    assert out == expected_out and out.count("\n") == 2
    transcript = (tmp_path / "a.txt").read_text()
    assert transcript == (tmp_path / "b.txt").read_text()
    assert "the cat" in transcript and "seven red" in transcript


class _FullDisk:
    """A file whose writes fail as on a full disk once `room` bytes are written: OSError
    ENOSPC without a file name, as the OS reports it."""

    def __init__(self, file, room: int):
        self._file, self._room = file, room

    def write(self, data):
        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _full_disk_for(monkeypatch, names: str, room: int = 100):
    """Writes through fileio to files whose name contains `names` fail after `room` bytes."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        file = real(fd, *args, **kwargs)
        if names in os.readlink(f"/proc/self/fd/{fd}"):
            return _FullDisk(file, room)
        return file
    monkeypatch.setattr(fileio.os, "fdopen", fdopen)


def test_full_disk_error_names_the_file(full_run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("an earlier transcript")
    _full_disk_for(monkeypatch, "out.txt", room=3)
    with pytest.raises(OSError) as info:
        fileio.atomic_write_text(path, "a new one")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(path))
    assert error_line(capsys, "infer", "-m", full_run / "final_model.cllm", "-p", "x", "-n", 2,
                      "-o", path) == f"error: {path}: No space left on device"
    assert path.read_text() == "an earlier transcript"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_full_disk_during_training_names_the_checkpoint(corpus, tmp_path, capsys,
                                                        monkeypatch):
    _full_disk_for(monkeypatch, "checkpoint_step_", room=1000)
    line = error_line(capsys, "train", "-d", corpus, "-c", tmp_path, *TINY, "--tokenizer",
                      "char", "--max-steps", 4, "--checkpoint-every", 2, "--eval-every", 0)
    assert line == f"error: {tmp_path / 'checkpoint_step_2.cllm'}: No space left on device"
    assert not list(tmp_path.glob("*.cllm")) and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / LOCK_FILE).exists()


# ---- the command's last line of defence ---------------------------------------------------

def test_unforeseen_exception_is_one_line(full_run, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something\nnobody foresaw")
    monkeypatch.setattr("cllm.infer.infer", broken)
    argv = ["infer", "-m", full_run / "final_model.cllm", "-p", "x"]
    assert error_line(capsys, *argv) == ("error: RuntimeError: something nobody foresaw (set "
                                         "CLLM_TRACEBACK=1 to see where)")
    monkeypatch.setenv("CLLM_TRACEBACK", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and err.startswith("Traceback (most recent call last)")
    # messages that quote a hostile file stay on one line
    assert str(CllmError("tensor a\nb\x0cc\ud800")) == "tensor a\\nb\\x0cc\\ud800"
