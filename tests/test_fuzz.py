"""Fuzzing the .cllm loader in the suite: a few hundred mutated files (header bytes, JSON
fields, lengths, metadata values, tokenizer JSON, tensor data, truncations) through the library,
and twenty through the command line. Each must load correctly or fail with a CllmError (the
command: exit 1 and one `error:` line), within a time and memory limit. The mutations are
bench/fuzz.py's, which runs ten thousand of them; the seeds are fixed, so a failure here
reproduces with `python bench/fuzz.py --seed SEED --cases 1 --mode api`."""
import importlib.util
import resource
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from cli_helpers import REPO, door, subprocess_env

_spec = importlib.util.spec_from_file_location("cllm_bench_fuzz", REPO / "bench" / "fuzz.py")
fuzz = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SEED = 20261130
LIBRARY_CASES = 300
COMMAND_CASES = 20
MEMORY_MB = 2048


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_bases")
    fuzz.build_bases(folder)
    return folder


def _shown(results):
    return "\n".join(f"seed {r['seed']} {r['outcome']} ({r['kind']} of {r['base']}: "
                     f"{r['detail']}): {r['line']}" for r in results)


def test_mutated_files_load_or_fail_cleanly(bases):
    """load_cllm + Model.from_file (+ load_checkpoint for checkpoints), each case in a child
    limited to 2 GB of address space and 20 s: a CllmError or a load, nothing else; and a
    file with a digest whose tensor data changed is never loaded."""
    results = fuzz.run_cases(bases, "api", SEED, LIBRARY_CASES, jobs=2, timeout=20,
                             memory_mb=MEMORY_MB)
    assert [r["seed"] for r in results] == list(range(SEED, SEED + LIBRARY_CASES))
    bad = [r for r in results if r["outcome"] not in fuzz.GOOD]
    assert not bad, _shown(bad)
    # every kind of mutation ran, and they reach both ends: refusals and files that still load
    assert {r["kind"] for r in results} == set(fuzz.KINDS)
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes["clean"] >= LIBRARY_CASES // 2 and outcomes["load"] >= 10, outcomes
    # each refusal names the file
    unnamed = [r for r in results if r["outcome"] == "clean" and "case.cllm" not in r["line"]]
    assert not unnamed, _shown(unnamed)


def _limited():
    limit = MEMORY_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _infer(path):
    return subprocess.run(door("module") + ["infer", "-m", str(path), "-p", "x", "-n", "2",
                                            "--threads", "1"],
                          env=dict(subprocess_env(), CLLM_TRACEBACK="0"), capture_output=True,
                          text=True, timeout=120, preexec_fn=_limited)


def test_mutated_files_through_the_command(bases, tmp_path):
    """`python -m cllm infer -m FILE -p x -n 2`: exit 0, or exit 1 with one `error:` line (and
    a notice for files without a digest), never a traceback or the last line of defence."""
    files = fuzz.load_bases(bases)
    cases = [fuzz.make_case(files, SEED + LIBRARY_CASES + i) for i in range(COMMAND_CASES)]
    paths = []
    for case in cases:
        paths.append(tmp_path / f"case_{case.seed}.cllm")
        paths[-1].write_bytes(case.data)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_infer, paths))
    problems = []
    for case, result in zip(cases, results):
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not line.startswith("notice: ")]
        clean = result.returncode == 0 or (
            result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ")
            and "CLLM_TRACEBACK" not in lines[0])
        if not clean or "Traceback" in result.stderr:
            problems.append(f"seed {case.seed} ({case.kind} of {case.base}: {case.detail}): "
                            f"exit {result.returncode}: {result.stderr[-1000:]!r}")
    assert not problems, "\n".join(problems)
    codes = Counter(result.returncode for result in results)
    assert codes[1] >= COMMAND_CASES // 2, codes
