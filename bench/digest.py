"""What the integrity digests of .cllm files cost: loading a seed-configuration model file
(mapped, 89 MB) with and without checking them, and the hashing rate per GB.

    python bench/digest.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SEED_CONFIG, machine_line  # noqa: E402


def median_load(path: str, verify: bool, repeats: int) -> float:
    from cllm.checkpoint import load_cllm
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_cllm(path, verify=verify)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from cllm import Model, ModelConfig
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "seed.cllm")
        Model.create(ModelConfig(**SEED_CONFIG), seed=0).save(path)
        size = os.path.getsize(path)
        median_load(path, True, 1)   # the file in the page cache, as after any save
        checked = median_load(path, True, args.repeats)
        unchecked = median_load(path, False, args.repeats)
    data = np.random.default_rng(0).bytes(1 << 30)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    rate = time.perf_counter() - start
    print(f"{machine_line()}; load average {os.getloadavg()[0]:.2f}")
    print(f"load of a {size / 1e6:.0f} MB .cllm: {checked * 1e3:.0f} ms with its digests "
          f"checked, {unchecked * 1e3:.1f} ms without")
    print(f"sha256: {rate:.2f} s per GB ({1 / rate:.2f} GB/s, one core)")


if __name__ == "__main__":
    main()
