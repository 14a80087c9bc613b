"""Single-threaded speed of the int8 (Q8) and bfloat16 matrix kernels of quant.h at the seed
configuration's shapes, against float32 through NumPy's BLAS (x @ W, W (IC, OC)), in GB/s of
weight bytes read per call (Q8: 1 byte a weight plus a float32 scale per 32).

    python bench/quant_kernels.py [--rounds 3]

Each matrix is cycled through enough copies (COPY_BYTES in all) that every call reads its
weights from memory rather than from the caches, as generating with a model larger than the
last-level cache does. A call's time includes the Python wrapper (allocation, quantizing x);
the time of a call on a one-row matrix is printed first as that overhead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line  # noqa: E402

from cllm import _core  # noqa: E402

SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384), (384, 30000)]   # (IC, OC)
COPY_BYTES = 128 << 20
CALL_SECONDS = 0.1


def seconds_per_call(fn, copies, rounds: int) -> float:
    """Best over `rounds` of the mean time of a call, cycling through the copies for at least
    CALL_SECONDS each round."""
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < CALL_SECONDS or calls < len(copies):
            fn(*copies[calls % len(copies)])
            calls += 1
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def replicate(arrays: tuple) -> list:
    n = max(1, COPY_BYTES // sum(a.nbytes for a in arrays))
    return [tuple(a.copy() for a in arrays) for _ in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(machine_line())
    tiny_q, tiny_s = _core.quantize_q8(np.ones((1, 384), np.float32))
    x1 = np.ones((1, 384), np.float32)
    overhead = seconds_per_call(lambda q, s: _core.q8_linear(x1, q, s, None, 1),
                                [(tiny_q, tiny_s)], args.rounds)
    print(f"q8_linear call overhead (OC = 1, M = 1): {overhead * 1e6:.1f} us\n")
    print(f"{'IC':>5} {'OC':>6} {'M':>2} | {'GB/s: fp32':>10} {'q8':>6} {'bf16':>6} | "
          f"{'us: fp32':>9} {'q8':>7} {'bf16':>7} | q8/fp32 time")
    with threadpool_limits(1):
        for IC, OC in SHAPES:
            W = rng.standard_normal((OC, IC)).astype(np.float32) * 0.05
            q, scale = _core.quantize_q8(W)
            w16 = _core.bf16_round(W.ravel()).reshape(OC, IC)
            kernels = [  # (weight bytes a call reads, copies of its weights, call)
                (W.nbytes, replicate((np.ascontiguousarray(W.T),)), lambda x, wt: x @ wt),
                (q.nbytes + scale.nbytes, replicate((q, scale)),
                 lambda x, q, s: _core.q8_linear(x, q, s, None, 1)),
                (w16.nbytes, replicate((w16,)), lambda x, w: _core.bf16_linear(x, w, None, 1)),
            ]
            for M in (1, 8):
                x = rng.standard_normal((M, IC)).astype(np.float32)
                times, rates = [], []
                for nbytes, copies, call in kernels:
                    t = seconds_per_call(lambda *weights: call(x, *weights), copies, args.rounds)
                    times.append(t)
                    rates.append(nbytes / t / 1e9)
                print(f"{IC:>5} {OC:>6} {M:>2} | {rates[0]:>10.1f} {rates[1]:>6.1f} "
                      f"{rates[2]:>6.1f} | {times[0] * 1e6:>9.1f} {times[1] * 1e6:>7.1f} "
                      f"{times[2] * 1e6:>7.1f} | {times[1] / times[0]:.2f}")


if __name__ == "__main__":
    main()
