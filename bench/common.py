"""Shared pieces of the benchmarks: the seed configuration, subprocess workers, machine facts."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cllm.config import GPT2_SWITCHES

# GPT-2 itself (every crystalline switch off), to compare with Hugging Face GPT-2
SEED_CONFIG = dict(vocab_size=30000, n_ctx=256, n_embd=384, n_layer=6, n_head=12, n_inner=1536,
                   tie_embeddings=True, **GPT2_SWITCHES)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    return f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {len(os.sched_getaffinity(0))} cores"


REPO = Path(__file__).resolve().parent.parent


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a running process, this one by default, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def thread_env(threads: int, source: Path | None = REPO / "src") -> dict:
    """The environment of a benchmark process: cllm from `source` (None: from wherever this
    environment's PYTHONPATH says), and every thread pool (OpenMP, OpenBLAS, MKL, the
    tokenizer's Rust pool) held to `threads`."""
    n = str(max(1, threads))
    env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n,
               RAYON_NUM_THREADS=n, RAYON_RS_NUM_CPUS=n)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def run_measured(command: list[str], threads: int, cwd: Path = REPO,
                 source: Path = REPO / "src") -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB) of one process run to its end."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=thread_env(threads, source),
                               stdout=subprocess.PIPE, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # the resource usage of this child alone
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command[:3])}... failed with exit status {status}")
    return wall, stdout, usage.ru_maxrss / 1024


def run_worker(script: str | Path, *args: str, threads: int,
               source: Path = REPO / "src") -> dict:
    """Run `script --worker ...` in a fresh process (its own peak RSS, its own thread pools),
    with cllm from `source`, and return the JSON object it prints on its last line."""
    _, out, _ = run_measured([sys.executable, str(script), "--worker", *args], threads,
                             source=source)
    return json.loads(out.strip().splitlines()[-1])


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, after one untimed call (first touch of
    every buffer, one-off start-up)."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matrix-product rate of NumPy's BLAS at `threads` threads."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    with threadpool_limits(threads, user_api="blas"):
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def train_flops_per_token(config, T: int) -> float:
    """Forward + backward arithmetic per token: 6 per matrix-product parameter (the head
    included) plus causal attention (scores and weighted sum, half of T x T on average)."""
    C, F, L, V = config.n_embd, config.n_inner, config.n_layer, config.vocab_size
    matmul_params = L * (3 * C * C + C * C + 2 * C * F) + V * C
    return 6 * matmul_params + 6 * L * T * C
