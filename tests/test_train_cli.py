"""`cllm train` end to end on a tiny model: the six phases and their files, exact resume,
crash safety, Ctrl-C, and clean errors for bad input."""
import json
import random
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from cli_helpers import (RUN, STEPS, TINY, assert_clean_error, door, metric_lines, run_cli,
                         run_door, subprocess_env)
from cllm.checkpoint import load_cllm
from cllm.data import open_dataset
from cllm.model import Model
from cllm.optim import scheduled_lr


@pytest.fixture(scope="module")
def full_run(trained_run):
    """An uninterrupted run: (its folder, its stdout)."""
    return trained_run


def test_six_phases_write_every_file(full_run, capsys):
    out, stdout = full_run
    phases = ["Data loading", "Vocabulary building", "Dataset creation",
              "Model initialization", "Training", "Final save"]
    positions = [stdout.index(f"[{i}/6] {name}") for i, name in enumerate(phases, 1)]
    assert positions == sorted(positions)
    assert "3 text files" in stdout and "1 skipped" in stdout

    final = safetensors.numpy.load_file(out / "final_model.cllm")
    model = load_cllm(out / "final_model.cllm")
    assert set(final) == {name for name, _ in model.config.tensor_shapes()}
    assert model.optimizer is None and model.tokenizer_json is not None
    assert model.config.n_ctx == 32 and model.config.n_inner == 64
    assert sorted(p.name for p in out.glob("checkpoint_step_*.cllm")) == \
        ["checkpoint_step_3.cllm", "checkpoint_step_6.cllm", "checkpoint_step_9.cllm"]
    checkpoint = load_cllm(out / "checkpoint_step_9.cllm")
    assert checkpoint.training["step"] == STEPS and checkpoint.optimizer is not None
    assert len(safetensors.numpy.load_file(out / "checkpoint_step_9.cllm")) == 3 * len(final)

    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert len((out / "vocab.txt").read_text().splitlines()) == len(vocab)
    assert "\\n" in (out / "vocab.txt").read_text().splitlines()
    assert len(open_dataset(out / "dataset.bin", len(vocab))) > 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert set(steps[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"}
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6, 9]
    assert "final_val_loss" in records[-1] and records[-1]["step"] == STEPS

    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == STEPS and stats["tokens"] == STEPS * 4 * 16
    assert stats["final_val_loss"] == records[-1]["final_val_loss"]
    for key in ("wall_time_s", "tokens_per_s", "best_val_loss", "peak_memory_mb"):
        assert stats[key] > 0
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    samples = (out / "samples.txt").read_text()
    assert samples.count("----- sample") == 3 and samples in stdout.replace("\r", "") + samples
    # the last line says how to use what the run made, and that command works
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("generate with it: cllm infer -m ")
    command = shlex.split(last.split(": ", 1)[1])
    code, text, err = run_cli(capsys, *command[1:4], "-p", "the", "-n", "5", "--seed", "1")
    assert code == 0, err
    assert text.startswith("the")


def test_learning_rate_schedule():
    lrs = [scheduled_lr(s, 10, 1e-3, 1e-4, 2) for s in range(1, 11)]
    assert lrs[:2] == [5e-4, 1e-3]
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(1e-4)


def _assert_same_run(a, b, from_step=0, steps=STEPS):
    """Same final parameters, same optimizer state at the last checkpoint, same metrics."""
    for name in ("final_model.cllm", f"checkpoint_step_{steps}.cllm"):
        fa, fb = safetensors.numpy.load_file(a / name), safetensors.numpy.load_file(b / name)
        assert fa.keys() == fb.keys()
        for key in fa:
            assert fa[key].tobytes() == fb[key].tobytes(), (name, key)
    assert metric_lines(a / "metrics.jsonl", from_step) == metric_lines(b / "metrics.jsonl",
                                                                         from_step)


def test_resume_after_a_kill_is_bitwise_exact(full_run, corpus, tmp_path, capsys):
    """The state a kill during step 5 leaves: checkpoint 3, metrics up to a partial line."""
    full, _ = full_run
    shutil.copy(full / "checkpoint_step_3.cllm", tmp_path)
    lines = (full / "metrics.jsonl").read_text().splitlines(keepends=True)
    done = [line for line in lines if json.loads(line)["step"] <= 4]
    (tmp_path / "metrics.jsonl").write_text("".join(done) + lines[len(done)][:20])
    # another thread count: results do not depend on it
    code, out, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *RUN, "-t", 2,
                             "--resume")
    assert code == 0, err
    assert "resuming from" in out and "at step 3" in out
    _assert_same_run(full, tmp_path)


def test_resume_from_a_checkpoint_copied_alone(full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    shutil.copy(full / "checkpoint_step_6.cllm", tmp_path)
    # the run's other flags come from the checkpoint
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume")
    assert code == 0, err
    _assert_same_run(full, tmp_path, from_step=6)
    assert (tmp_path / "tokenizer.json").read_text() == (full / "tokenizer.json").read_text()


def test_damaged_newest_checkpoint_is_skipped(full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    for step in (3, 6):
        shutil.copy(full / f"checkpoint_step_{step}.cllm", tmp_path)
    data = (tmp_path / "checkpoint_step_6.cllm").read_bytes()
    (tmp_path / "checkpoint_step_6.cllm").write_bytes(data[:len(data) // 2])
    code, out, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *RUN, "--resume")
    assert code == 0, err
    assert "warning: skipping a damaged checkpoint" in err and "checkpoint_step_6" in err
    assert "at step 3" in out
    _assert_same_run(full, tmp_path, from_step=3)


def _wait_for_steps(path, process, steps):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and path.read_text().count("\n") >= steps:
            return
        time.sleep(0.05)
    raise AssertionError("training did not start")


def _start_long_run(corpus, out, door_name, *extra):
    return subprocess.Popen(
        door(door_name) + ["train", "-d", str(corpus), "-c", str(out), *map(str, TINY),
                           "--tokenizer", "char", "--max-steps", "1000000", "--eval-every", "0",
                           *map(str, extra)],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_leaves_only_loadable_files(corpus, tmp_path):
    # a checkpoint every step: the kill is likely to land in the middle of writing one
    process = _start_long_run(corpus, tmp_path, "tools", "--checkpoint-every", 1,
                              "--keep-checkpoints", 2)
    _wait_for_steps(tmp_path / "metrics.jsonl", process, 3)
    time.sleep(random.uniform(0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    models = list(tmp_path.glob("*.cllm"))
    assert models
    for path in models:
        load_cllm(path)
    for name in ("tokenizer.json", "dataset.bin"):
        assert (tmp_path / name).stat().st_size > 0
    newest = max(load_cllm(p).training["step"] for p in models)
    (tmp_path / ".checkpoint_step_9.cllm.0123456789ab.tmp").write_bytes(b"partial")
    result = run_door("module", "train", "-d", corpus, "-c", tmp_path, "--resume",
                      "--max-steps", newest + 2)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # what killed writers left is cleared away
    steps = [r["step"] for r in metric_lines(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, newest + 3))


def test_ctrl_c_writes_a_checkpoint_and_exits_130(corpus, tmp_path):
    process = _start_long_run(corpus, tmp_path, "module", "--checkpoint-every", 1000)
    _wait_for_steps(tmp_path / "metrics.jsonl", process, 3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in out
    last_step = metric_lines(tmp_path / "metrics.jsonl")[-1]["step"]
    (checkpoint,) = tmp_path.glob("checkpoint_step_*.cllm")
    assert checkpoint.name == f"checkpoint_step_{last_step}.cllm"
    assert load_cllm(checkpoint).training["step"] == last_step


def test_init_from_a_created_model(full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    model = tmp_path / "start.cllm"
    code, out, err = run_cli(capsys, "create", "-e", 16, "-l", 1, "-H", 2, "-s", 24,
                             "--tokenizer", full / "tokenizer.json", "-o", model)
    assert code == 0, err
    created = load_cllm(model)
    code, out, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path / "run", "-b", 4,
                             "-t", 1, "--max-steps", 3, "--init-from", model)
    assert code == 0, err
    trained = load_cllm(tmp_path / "run" / "final_model.cllm")
    assert trained.config == created.config
    assert trained.tokenizer_json == created.tokenizer_json
    # the architecture is the file's: a flag that says otherwise is an error
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path / "other",
                           "--init-from", model, "-e", 32)
    assert "--embed 32 contradicts" in assert_clean_error(code, err)


def test_a_new_run_does_not_overwrite_an_earlier_one(full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    shutil.copy(full / "checkpoint_step_3.cllm", tmp_path)
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *RUN)
    assert "--resume" in assert_clean_error(code, err)


@pytest.mark.parametrize("setup, flags, message", [
    ("missing", [], "no such corpus folder"),
    ("empty", [], "holds no files"),
    ("binary", [], "none of its 1 files is UTF-8 text"),
    (None, ["-e", "abc"], "argument -e/--embed: must be an integer >= 1, got 'abc'"),
    (None, ["-b", "0"], "argument -b/--batch: must be an integer >= 1, got '0'"),
    (None, ["-l", "-2"], "argument -l/--layers: must be an integer >= 1, got '-2'"),
    (None, ["-r", "nan"], "argument -r/--lr: must be a number > 0"),
    (None, ["-e", "10", "-H", "3"], "must be divisible by -H/--heads"),
    (None, ["-s", "100000"], "the corpus is too short"),
    ("file_as_checkpoint", [], "is a file, not a folder"),
])
def test_bad_train_input(setup, flags, message, corpus, tmp_path, capsys):
    data, out = corpus, tmp_path / "out"
    if setup == "missing":
        data = tmp_path / "nowhere"
    elif setup == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif setup == "binary":
        data = tmp_path / "binary"
        data.mkdir()
        (data / "blob.bin").write_bytes(b"\0\1\2")
    elif setup == "file_as_checkpoint":
        out = tmp_path / "a_file"
        out.write_text("x")
    code, _, err = run_cli(capsys, "train", "-d", data, "-c", out, *TINY, "--tokenizer", "char",
                           "--max-steps", 2, *flags)
    line = assert_clean_error(code, err, 2 if "argument" in message else 1)
    assert message in line


def _damage(kind, path, full):
    data = (full / "checkpoint_step_3.cllm").read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:-100])
    elif kind == "corrupt":
        path.write_bytes(data[:8] + b"#" * 50 + data[58:])
    elif kind == "foreign":
        safetensors.numpy.save_file({"w": np.zeros(3, dtype=np.float32)}, str(path))
    elif kind == "model_only":
        shutil.copy(full / "final_model.cllm", path)


@pytest.mark.parametrize("kind, message", [
    ("truncated", "truncated"), ("corrupt", "header is not valid JSON"),
    ("foreign", "not a .cllm file"), ("model_only", "not a training checkpoint"),
])
def test_bad_checkpoint_on_resume(kind, message, full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    path = tmp_path / "checkpoint_step_3.cllm"
    _damage(kind, path, full)
    before = path.read_bytes()
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume")
    line = assert_clean_error(code, err, 1)
    assert "cannot resume" in line and message in line
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_3.cllm"]


def test_checkpoint_of_another_architecture(full_run, corpus, tmp_path, capsys):
    full, _ = full_run
    shutil.copy(full / "checkpoint_step_3.cllm", tmp_path)
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume", "-l", 2)
    line = assert_clean_error(code, err, 1)
    assert "--layers 2 contradicts the checkpoint, which has 1" in line


def test_resume_without_checkpoint(corpus, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume")
    assert "no checkpoint_step_N.cllm to resume from" in assert_clean_error(code, err, 1)


def test_crystalline_switches_from_the_command_line(corpus, tmp_path, capsys):
    """The switches reach the model, are saved in it, and the crystalline loss run also logs
    plain cross-entropy at every step and evaluation."""
    code, out, _ = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, *TINY, "--max-steps", 4,
                           "--eval-every", 2, "--eval-batches", 1, "--checkpoint-every", 2,
                           "--init", "lattice",
                           "--position", "learned", "--attention", "dense", "--loss",
                           "crystalline", "--crystalline-alpha", "0.3")
    assert code == 0
    config = Model.load(tmp_path / "final_model.cllm").config
    assert (config.init, config.position, config.attention, config.loss,
            config.crystalline_alpha) == ("lattice", "learned", "dense", "crystalline", 0.3)
    lines = metric_lines(tmp_path / "metrics.jsonl")
    assert all("ce" in r for r in lines if "loss" in r)
    assert all("val_ce" in r for r in lines if "val_loss" in r)
    assert any("final_val_ce" in r for r in lines)
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "--resume",
                           "--attention", "ulam")
    assert "--attention ulam contradicts" in assert_clean_error(code, err, 1)


def test_odd_head_width_with_angular_positions(corpus, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path, "-e", 6, "-H", 2)
    assert "must be even" in assert_clean_error(code, err, 1)


# ---- checkpoints written by earlier versions ---------------------------------------------

V0_1_RUN = Path(__file__).parent / "fixtures" / "v0_1_run"
# The command that wrote fixtures/v0_1_run/checkpoint_step_3.cllm with cllm 0.1.0 (before
# TrainConfig: its checkpoints saved the command line's arguments) on notes.txt.
V0_1_ARGS = ["--tokenizer", "char", "-e", "16", "-l", "1", "-H", "2", "-s", "16", "-b", "4",
             "--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "3",
             "--eval-batches", "2", "--warmup", "2", "-r", "1e-2", "--seed", "5"]


def test_checkpoint_of_version_0_1_resumes_bitwise_exact(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(V0_1_RUN / "notes.txt", corpus)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(V0_1_RUN / "checkpoint_step_3.cllm", resumed)
    assert "args" in load_cllm(resumed / "checkpoint_step_3.cllm").training
    code, out, err = run_cli(capsys, "train", "-d", corpus, "-c", resumed, "-t", 2, "--resume")
    assert code == 0, err
    assert "at step 3" in out
    uninterrupted = tmp_path / "uninterrupted"
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", uninterrupted, *V0_1_ARGS)
    assert code == 0, err
    # the resumed run has no metrics of steps 1 to 3: compare what both did from there on
    _assert_same_run(uninterrupted, resumed, from_step=3, steps=6)
