"""Phases 1-3 of `cllm train` (data loading, vocabulary, dataset) on a corpus of about 50 MB,
the seed's production size: wall time of each phase and peak RSS.

    python bench/data_phases.py [--mb 50] [--tokenizer bpe|char|both] [--threads 2]

The corpus is the installed standard library's .py sources (site-packages left out), copied
into a temporary folder, repeated until it reaches the size asked for. `cllm train` runs as a
subprocess; when it announces phase 4 its peak RSS is read from /proc and it is stopped.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, peak_rss_mb, thread_env  # noqa: E402


def make_corpus(folder: Path, size: int) -> int:
    """Copy stdlib sources into `folder` (copy0/, copy1/... as needed) up to `size` bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.rglob("*.py")
                     if "site-packages" not in p.parts and p.is_file())
    total, copy = 0, 0
    while total < size:
        for path in sources:
            if total >= size:
                break
            target = folder / f"copy{copy}" / path.relative_to(stdlib)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            total += target.stat().st_size
        copy += 1
    return total


def run_phases(corpus: Path, out: Path, tokenizer: str, threads: int) -> dict:
    """Seconds from start to the end of each of phases 1-3, and the peak RSS by then."""
    command = [sys.executable, "-m", "cllm", "train", "-d", str(corpus), "-c", str(out),
               "--tokenizer", tokenizer, "-e", "16", "-l", "1", "-H", "2", "-t", str(threads)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=thread_env(threads), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    marks = {}
    for line in process.stdout:
        if line.startswith("[") and "/6]" in line:
            phase = int(line[1])
            marks[phase] = time.perf_counter() - start
            if phase == 4:
                rss = peak_rss_mb(process.pid)
                process.send_signal(signal.SIGKILL)
                break
    process.wait()
    if 4 not in marks:
        raise SystemExit(f"cllm train stopped before phase 4 (exit status {process.returncode})")
    return dict(startup=marks[1], loading=marks[2] - marks[1], vocabulary=marks[3] - marks[2],
                dataset=marks[4] - marks[3], total=marks[4], rss_mb=rss,
                dataset_mb=(out / "dataset.bin").stat().st_size / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--tokenizer", choices=("bpe", "char", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    kinds = ("bpe", "char") if args.tokenizer == "both" else (args.tokenizer,)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        size = make_corpus(corpus, int(args.mb * 1e6))
        files = sum(1 for p in corpus.rglob("*") if p.is_file())
        print(f"corpus: {files} files, {size / 1e6:.1f} MB")
        for kind in kinds:
            r = run_phases(corpus, Path(tmp) / f"out_{kind}", kind, args.threads)
            print(f"{kind:4s}: phases 1-3 in {r['total']:.1f} s (start-up {r['startup']:.1f}, "
                  f"loading {r['loading']:.1f}, vocabulary {r['vocabulary']:.1f}, dataset "
                  f"{r['dataset']:.1f}); peak RSS {r['rss_mb']:.0f} MB; dataset.bin "
                  f"{r['dataset_mb']:.1f} MB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
