"""Tables of the crystalline components (CRYSTALLINE.md sections 2 to 5), computed once per
model in float64 and handed to the core in float32 (or int32).

phi is the golden ratio; u(n) is the point of n >= 1 on the Ulam square spiral."""
from __future__ import annotations

import math

import numpy as np

PHI = (1 + math.sqrt(5)) / 2
CLOCK = 12  # the 12-fold clock: symmetry groups of the lattice, period of the fastest rotation


def primes(count: int) -> np.ndarray:
    """The first `count` primes, 2, 3, 5, ..."""
    # the n-th prime is below n (ln n + ln ln n) for n >= 6
    bound = 15 if count < 6 else int(count * (math.log(count) + math.log(math.log(count)))) + 1
    sieve = np.ones(bound + 1, dtype=bool)
    sieve[:2] = False
    for p in range(2, math.isqrt(bound) + 1):
        if sieve[p]:
            sieve[p * p::p] = False
    return np.flatnonzero(sieve)[:count]


def lattice_embeddings(vocab_size: int, n_embd: int, scale: float) -> np.ndarray:
    """(V, C) float64: wte[t, d] = scale sqrt 2 cos(2 pi (frac(n alpha_d) + k / 12)) with
    n = t + 1, k = n mod 12, alpha_d = frac(sqrt(p_d)), p_d the (d+1)-th prime."""
    alpha = np.modf(np.sqrt(primes(n_embd).astype(np.float64)))[0]    # (C)
    n = np.arange(1, vocab_size + 1, dtype=np.float64)[:, None]        # (V, 1)
    k = np.arange(1, vocab_size + 1)[:, None] % CLOCK                  # (V, 1)
    return scale * math.sqrt(2) * np.cos(2 * math.pi * (np.modf(n * alpha)[0] + k / CLOCK))


def angular_tables(n_ctx: int, n_head: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of theta(p, h, i) = p (2 pi / 12) phi^-(i + h / H), each (n_ctx, H, hd/2)
    float64: the angle turning pair i of head h at position p."""
    p = np.arange(n_ctx, dtype=np.float64)[:, None, None]                 # (n_ctx, 1, 1)
    h = np.arange(n_head, dtype=np.float64)[None, :, None]                # (1, H, 1)
    i = np.arange(head_dim // 2, dtype=np.float64)[None, None, :]         # (1, 1, hd/2)
    theta = p * (2 * math.pi / CLOCK) * PHI ** -(i + h / n_head)
    return np.cos(theta), np.sin(theta)


def ulam(n: int) -> tuple[int, int]:
    """u(n), n >= 1: 1 at (0, 0), 2 at (1, 0), 3 at (1, 1), counter-clockwise."""
    if n == 1:
        return (0, 0)
    k = (math.isqrt(n - 1) + 1) // 2       # ring k holds (2k-1)^2+1 .. (2k+1)^2
    o = n - (2 * k - 1) ** 2               # 1 .. 8k along the ring
    if o <= 2 * k:
        return (k, -k + o)
    if o <= 4 * k:
        return (k - (o - 2 * k), k)
    if o <= 6 * k:
        return (-k, k - (o - 4 * k))
    return (-k + (o - 6 * k), -k)


def ulam_points(count: int) -> np.ndarray:
    """(count, 2) int32: u(1), ..., u(count)."""
    return np.array([ulam(n) for n in range(1, count + 1)], dtype=np.int32).reshape(count, 2)


def ulam_neighbours(n_ctx: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys each query position may attend to, as compressed rows (int32):
    keys[start[p]:start[p + 1]] are, in increasing order, the p' <= p with
    max(|dx|, |dy|) <= radius between u(p + 1) and u(p' + 1).

    They depend on p alone, so the first T rows serve every sequence length T <= n_ctx."""
    points = [ulam(p + 1) for p in range(n_ctx)]
    position_at = {point: p for p, point in enumerate(points)}
    start, keys = [0], []
    for p, (x, y) in enumerate(points):
        near = (position_at.get((x + dx, y + dy))
                for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1))
        keys += sorted(q for q in near if q is not None and q <= p)
        start.append(len(keys))
    return np.array(start, dtype=np.int32), np.array(keys, dtype=np.int32)
