"""This machine's float32 matrix-multiply peak through NumPy's BLAS: a 2048^3 sgemm, best of
several, at 2 threads and at 1, in GFLOP/s. The ceiling any CPU trainer's matmuls can reach.

Run: python bench/matmul_peak.py
"""
import time

import numpy as np
from threadpoolctl import threadpool_limits

N = 2048
REPEATS = 7


def sgemm_gflops(threads: int) -> float:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((N, N), dtype=np.float32) for _ in range(2))
    out = np.empty((N, N), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)  # warms caches, pages and BLAS threads
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    return 2 * N ** 3 / best / 1e9


def main():
    for threads in (2, 1):
        print(f"NumPy float32 {N}^3 matmul, {threads} thread{'s' if threads > 1 else ''}: "
              f"{sgemm_gflops(threads):.1f} GFLOP/s (best of {REPEATS})")


if __name__ == "__main__":
    main()
