"""Running the command line in tests: in-process through main(argv), or as a subprocess
through one of its doors, and the small corpus every command-line test trains on."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from cllm.cli import main

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"

# A tiny model that trains in milliseconds per step.
TINY = ["-e", "16", "-l", "1", "-H", "2", "-s", "16", "-b", "4", "-t", "1", "--warmup", "2"]
TIMING_FIELDS = ("tokens_per_s", "elapsed")
# The uninterrupted run the train and hardening tests share: STEPS steps of TINY with
# checkpoints at 3, 6 and 9.
STEPS = 9
RUN = [*TINY, "--tokenizer", "char", "--max-steps", STEPS, "--checkpoint-every", 3,
       "--keep-checkpoints", 5, "--eval-every", 3, "--eval-batches", 2]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `cllm argv` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: help, version and argument errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def door(name: str) -> list[str]:
    """The command line that runs the program through one of its doors."""
    if name == "tools":
        return [sys.executable, str(REPO / "tools" / "cllm")]
    return [sys.executable, "-m", "cllm"]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(SRC))


def run_door(name: str, *argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(door(name) + [str(a) for a in argv], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, **kwargs)


def write_corpus(root: Path, files: int = 3, lines: int = 120) -> Path:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while seven red cats watch from an "
             "old stone wall").split()
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = root / ("sub" if i % 2 else "") / f"part{i}.txt"
        path.write_text("".join(" ".join(rng.choice(words) for _ in range(9)) + ".\n"
                                for _ in range(lines)))
    (root / "binary.dat").write_bytes(bytes(range(256)))
    return root


def metric_lines(path: Path, after_step: int = 0) -> list[dict]:
    """metrics.jsonl without its timing fields, from the steps after `after_step`."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in records if r["step"] > after_step]


def assert_clean_error(code, err: str, expected_code=None) -> str:
    """A non-zero exit, no traceback, and one line on stderr besides progress bars (a phase
    may have shown one before the error arose); returns that line."""
    assert code != 0
    if expected_code is not None:
        assert code == expected_code
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert "error: " in lines[0]
    return lines[0]
