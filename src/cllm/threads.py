"""How many threads: the usable cores, and BLAS held to one thread."""
from __future__ import annotations

import os

import numpy as np
from threadpoolctl import ThreadpoolController

_blas_controller = None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def blas_single_threaded():
    """Context in which BLAS runs on one thread: the spheres are the parallelism, and BLAS
    threads nested inside them would oversubscribe the cores."""
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def positive_count(name: str, value, default: int) -> int:
    """A count argument (threads, spheres): `default` for None, else an integer >= 1."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
