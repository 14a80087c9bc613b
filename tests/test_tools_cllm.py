"""tools/cllm, the command of a source checkout: it runs an installed cllm when the Python
running it has one, else the checkout's .venv (built by `make install` when missing or out of
date), from any directory and through symlinks; its own failures print one `cllm: error:` line."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "cllm"
TIMEOUT = 120
# this interpreter without site-packages: standard library only, so no cllm
BARE = [sys.executable, "-I", "-S"]
SETUP = "cllm: setting up the project's environment in"


def env(**changes) -> dict:
    values = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    values.update(changes)
    return values


def run(argv, cwd, **changes) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env(**changes),
                          capture_output=True, text=True, timeout=TIMEOUT)


def lacks_cllm(python: list[str]) -> bool:
    return run(python + ["-c", "import cllm"], cwd="/").returncode != 0


def assert_usage(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cllm")
    assert "Traceback" not in result.stderr


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cllm: error:")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture
def venv_current():
    """Going through .venv must not rebuild it here: skip unless make calls it up to date."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if subprocess.run(["make", "-q", "-C", str(REPO), "install"], capture_output=True,
                      timeout=TIMEOUT).returncode != 0:
        pytest.skip("the checkout's .venv is not up to date (`make -q install`)")


def test_help_from_another_directory(tmp_path):
    assert_usage(run([sys.executable, SCRIPT, "help"], cwd=tmp_path))


@pytest.mark.parametrize("python", [BARE, [os.path.join(sys.base_prefix, "bin", "python3"), "-I"]],
                         ids=["bare", "base-python"])
def test_a_python_without_cllm_goes_through_the_venv(python, tmp_path, venv_current):
    if not os.path.exists(python[0]) or not lacks_cllm(python):
        pytest.skip(f"{' '.join(python)} can import cllm (or does not exist)")
    result = run(python + [SCRIPT, "help"], cwd=tmp_path)
    assert_usage(result)
    assert SETUP not in result.stderr
    result = run(python + [SCRIPT, "no-such-command"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # cllm's own exit code


def test_a_symlink_to_it(tmp_path, venv_current):
    link = tmp_path / "cllm"
    link.symlink_to(SCRIPT)
    assert_usage(run(BARE + [link, "help"], cwd=tmp_path))
    version = run([link, "--version"], cwd=tmp_path)  # through its shebang line
    assert version.returncode == 0 and version.stdout.startswith("cllm "), version.stderr


@pytest.fixture
def fake_root(tmp_path) -> Path:
    """A checkout of nothing but a copy of the script: the test writes its Makefile."""
    assert lacks_cllm(BARE)
    root = tmp_path / "root"
    (root / "tools").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "tools" / "cllm")
    return root


def test_setting_up_then_replacing_itself_with_the_venv_python(fake_root, tmp_path):
    # a stand-in for the venv's python: shows its arguments and pid, exits with 7
    (fake_root / "python.sh").write_text('#!/bin/sh\necho "$$ $*"\nexit 7\n')
    (fake_root / "Makefile").write_text(
        ".PHONY: install\ninstall: .venv/.installed\n"
        ".venv/.installed: python.sh\n"
        "\tmkdir -p .venv/bin && cp python.sh .venv/bin/python && chmod +x .venv/bin/python\n"
        "\ttouch $@\n")
    script = fake_root / "tools" / "cllm"
    first = run(BARE + [script, "help", "a b"], cwd=tmp_path)
    assert first.returncode == 7, first.stderr
    assert first.stdout.split(" ", 1)[1] == "-m cllm help a b\n"
    assert first.stderr.splitlines()[0] == (
        f"{SETUP} {fake_root}/.venv (first run: a few minutes)...")
    # up to date: not a word of its own, and the process is the venv's python itself (execv)
    process = subprocess.Popen(BARE + [str(script), "--version"], cwd=tmp_path, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=TIMEOUT)
    assert (process.returncode, out, err) == (7, f"{process.pid} -m cllm --version\n", "")
    # out of date: updated first
    os.utime(fake_root / ".venv" / ".installed", (0, 0))
    update = run(BARE + [script, "help"], cwd=tmp_path)
    assert update.returncode == 7
    assert update.stderr.startswith(f"cllm: updating the project's environment in {fake_root}")


def test_a_failing_install(fake_root, tmp_path):
    (fake_root / "Makefile").write_text(
        "install:\n\t@echo compiling the core\n\t@echo the compiler failed >&2; exit 3\n")
    result = run(BARE + [fake_root / "tools" / "cllm", "help"], cwd=tmp_path)
    error = assert_one_error_line(result)
    assert result.stdout == ""  # make's output goes to stderr
    assert result.stderr.startswith(SETUP)
    assert "compiling the core\nthe compiler failed\n" in result.stderr
    assert f"make -C {fake_root} install` exited with 2" in error


def test_a_failing_install_when_started_with_sigchld_ignored(fake_root, tmp_path):
    """A parent that ignores SIGCHLD passes that on: the script must still see make's status."""
    (fake_root / "Makefile").write_text("install:\n\t@exit 3\n")
    result = subprocess.run(
        BARE + [str(fake_root / "tools" / "cllm"), "help"], cwd=tmp_path, env=env(),
        capture_output=True, text=True, timeout=TIMEOUT,
        preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    assert f"make -C {fake_root} install` exited with 2" in assert_one_error_line(result)


def test_without_make(fake_root, tmp_path):
    (fake_root / "Makefile").write_text("install:\n\ttrue\n")
    (tmp_path / "bin").mkdir()
    result = run(BARE + [fake_root / "tools" / "cllm", "help"], cwd=tmp_path,
                 PATH=str(tmp_path / "bin"))
    assert assert_one_error_line(result) == result.stderr.strip()
    assert "`make` is not installed" in result.stderr


def test_outside_a_checkout(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "tools" / "cllm")
    result = run(BARE + [tmp_path / "tools" / "cllm", "help"], cwd=tmp_path)
    assert assert_one_error_line(result) == result.stderr.strip()
    assert "not a cllm checkout" in result.stderr


def test_ctrl_c_while_setting_up(fake_root, tmp_path):
    (fake_root / "Makefile").write_text("install:\n\tsleep 60\n")
    # its own session, so that Ctrl-C can reach it and make together, as in a terminal
    process = subprocess.Popen(BARE + [str(fake_root / "tools" / "cllm"), "help"], cwd=tmp_path,
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stderr.readline().startswith(SETUP)
        for line in process.stderr:  # until make has started its recipe
            if line == "sleep 60\n":
                break
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "Traceback" not in err and err.splitlines()[-1] == "cllm: error: interrupted"
