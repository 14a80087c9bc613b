"""The recursive level: training over MPI processes equals one process bit for bit, resumes
across process counts, sums in exactly one order, and ends cleanly when a rank dies. Every
job runs in its own process group with a timeout, and is killed whole if the test fails."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import REPO, subprocess_env, write_corpus
from cllm.checkpoint import load_cllm

pytest.importorskip("mpi4py", reason="MPI tests need the mpi extra: pip install '.[mpi]'")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep
                       + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install '.[mpi]')")

RUN = ["--tokenizer", "char", "-e", "16", "-l", "1", "-H", "2", "-s", "16", "-b", "6",
       "--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "3", "--eval-batches",
       "2", "--warmup", "2", "-r", "1e-2", "-t", "1"]
TIMEOUT = 180


def run_job(command: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command in a session of its own; on timeout kill the whole group and fail."""
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command[:6])}... did not end within {timeout} s")
    finally:
        _kill_group(process.pid)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cllm(*argv) -> list[str]:
    return [sys.executable, "-m", "cllm", *map(str, argv)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=2, lines=60)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process's runs, S=6 and S=4."""
    runs = {}
    for spheres in (6, 4):
        out = tmp_path_factory.mktemp(f"single{spheres}")
        result = run_job(cllm("train", "-d", corpus, "-c", out, *RUN, "--spheres", spheres))
        assert result.returncode == 0, result.stderr
        runs[spheres] = out
    return runs


def assert_same_run(a: Path, b: Path) -> None:
    """The same final model and the same last checkpoint (weights and optimizer state)."""
    assert (a / "final_model.cllm").read_bytes() == (b / "final_model.cllm").read_bytes()
    ca, cb = load_cllm(a / "checkpoint_step_6.cllm"), load_cllm(b / "checkpoint_step_6.cllm")
    for moment in ("m", "v"):
        for name, tensor in ca.optimizer[moment].items():
            assert tensor.tobytes() == cb.optimizer[moment][name].tobytes(), (moment, name)


@pytest.mark.parametrize("processes, spheres", [(1, 6), (2, 6), (3, 6), (3, 4)])
def test_processes_train_bitwise_like_one(processes, spheres, corpus, single, tmp_path):
    out = tmp_path / "run"
    if processes == 1:    # the launcher's path: --processes 1 runs in this process
        result = run_job(cllm("train", "-d", corpus, "-c", out, *RUN, "--spheres", spheres,
                              "--processes", 1))
    elif processes == 2:  # --processes starts mpiexec itself
        result = run_job(cllm("train", "-d", corpus, "-c", out, *RUN, "--spheres", spheres,
                              "--processes", processes))
    else:                 # mpiexec started by the user, as on a cluster
        result = run_job([MPIEXEC, "-n", str(processes), sys.executable, "-m", "mpi4py",
                          "-m", "cllm", "train", "-d", str(corpus), "-c", str(out), *RUN,
                          "--spheres", str(spheres)])
    assert result.returncode == 0, result.stderr
    if processes > 1:
        blocks = {(3, 4): "2, 1, 1", (3, 6): "2, 2, 2", (2, 6): "3, 3"}[processes, spheres]
        assert f"{processes} processes, spheres in blocks of {blocks}" in result.stdout
    assert_same_run(single[spheres], out)


def test_resume_across_process_counts(corpus, single, tmp_path):
    """A checkpoint of the one-process run continued by 3 processes, its continuation's
    checkpoint by 2: the end equals the run that was never stopped."""
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(single[6] / "checkpoint_step_3.cllm", first)
    result = run_job(cllm("train", "-d", corpus, "-c", first, "--resume", "--processes", 2,
                          "-t", 1))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert_same_run(single[6], first)


def test_chain_reduction_keeps_the_order_of_one_process():
    result = run_job([MPIEXEC, "-n", "3", sys.executable, str(REPO / "tests" /
                                                             "mpi_chain_check.py")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_killing_a_rank_ends_the_job(corpus, tmp_path):
    out = tmp_path / "run"
    # later flags override RUN's: a long run, checkpoints every 20 steps
    command = cllm("train", "-d", corpus, "-c", out, *RUN, "--max-steps", 100000,
                   "--checkpoint-every", 20, "--eval-every", 0, "--processes", 2)
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint_step_*.cllm")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
        ranks = [pid for pid in _children(process.pid) if b"mpi4py" in _cmdline(pid)
                 and b"mpiexec" not in _cmdline(pid).split(b"\0")[0]]
        assert len(ranks) == 2, ranks
        killed = time.monotonic()
        os.kill(max(ranks), signal.SIGKILL)
        out_text, err = process.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        _kill_group(process.pid)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    assert "error: the training job of 2 processes" in err.strip().splitlines()[-1]
    newest = max(out.glob("checkpoint_step_*.cllm"), key=lambda p: int(p.stem.split("_")[-1]))
    assert load_cllm(newest).training["step"] > 0
    assert not [pid for pid in _children(process.pid) if b"cllm" in _cmdline(pid)]


def _children(pid: int) -> list[int]:
    """Every descendant of pid (through /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
