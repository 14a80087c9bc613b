"""CRYSTALLINE.md sections 2 to 5 transcribed into plain float64 NumPy, formula by formula.

Written from the text alone, independently of the package (cllm.crystal and the core), for
clarity rather than speed: tests compare the core against it. reference.py uses it to run the
whole GPT-2 with every switch.

Notation: V vocabulary, C width, H heads, hd = C / H, T length, phi the golden ratio.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

PHI = (1 + math.sqrt(5)) / 2


def first_primes(count):
    """[2, 3, 5, ...], `count` of them, by trial division."""
    found = []
    n = 2
    while len(found) < count:
        if all(n % p for p in found if p * p <= n):
            found.append(n)
        n += 1
    return found


# ---- section 2: lattice embeddings ---------------------------------------------------------

def lattice(n, d, k, lam, primes):
    """L(n, d, k, lambda) = lambda sqrt 2 cos(2 pi (frac(n alpha_d) + k / 12))."""
    alpha = math.sqrt(primes[d]) % 1.0
    return lam * math.sqrt(2) * math.cos(2 * math.pi * ((n * alpha) % 1.0 + k / 12))


def lattice_table(V, C, sigma=0.02):
    """(V, C): wte[t, d] = L(t + 1, d, (t + 1) mod 12, sigma)."""
    primes = first_primes(C)
    return np.array([[lattice(t + 1, d, (t + 1) % 12, sigma, primes) for d in range(C)]
                     for t in range(V)])


# ---- section 3: angular attention ----------------------------------------------------------

def theta(n, k, lam, omega, psi):
    """theta(n, k, lambda, omega, psi) = n omega phi^-(lambda + psi)."""
    return n * omega * PHI ** -(lam + psi)


def angular_angles(positions, H, hd):
    """(len(positions), H, hd/2): the angle of pair i of head h at each position p, that is
    theta(n=p, k=h, lambda=i, omega=2 pi / 12, psi=h / H)."""
    return np.array([[[theta(p, h, i, 2 * math.pi / 12, h / H) for i in range(hd // 2)]
                      for h in range(H)] for p in positions])


def rotate(x, angles):
    """x (B, T, C), angles (T, H, hd/2) -> x with pair (2i, 2i+1) of each head turned:
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)."""
    B, T, C = x.shape
    _, H, half = angles.shape
    pairs = x.reshape(B, T, H, half, 2)
    c, s = np.cos(angles), np.sin(angles)
    out = np.stack([pairs[..., 0] * c - pairs[..., 1] * s,
                    pairs[..., 0] * s + pairs[..., 1] * c], axis=-1)
    return out.reshape(B, T, C)


def rotate_qk_forward(qkv, angles):
    """qkv (B, T, 3C) -> q and k rotated, v as it is."""
    C = qkv.shape[-1] // 3
    return np.concatenate([rotate(qkv[..., :C], angles), rotate(qkv[..., C:2 * C], angles),
                           qkv[..., 2 * C:]], axis=-1)


def rotate_qk_backward(dqkv, angles):
    """The gradient through a rotation is the rotation by the opposite angle."""
    return rotate_qk_forward(dqkv, -angles)


# ---- section 4: Ulam spiral attention ------------------------------------------------------

def spiral():
    """u(1), u(2), ...: the square spiral walked one step at a time (rather than by the closed
    form of CRYSTALLINE.md): 1 at the origin, then straight runs of 1, 1, 2, 2, 3, 3, ...
    steps, turning counter-clockwise after each run (right, up, left, down), so that 2 is at
    (1, 0) and 3 at (1, 1)."""
    x = y = 0
    yield (x, y)
    for turn in itertools.count():
        dx, dy = ((1, 0), (0, 1), (-1, 0), (0, -1))[turn % 4]
        for _ in range(turn // 2 + 1):
            x, y = x + dx, y + dy
            yield (x, y)


_WALKER = spiral()
_WALKED = []   # u(1), u(2), ... as far as walked so far


def ulam(n):
    """u(n), n >= 1."""
    while len(_WALKED) < n:
        _WALKED.append(next(_WALKER))
    return _WALKED[n - 1]


def ulam_mask(T, r):
    """(T, T) boolean: query p may attend to key p' iff p' <= p and the Chebyshev distance
    between u(p + 1) and u(p' + 1) is at most r."""
    mask = np.zeros((T, T), dtype=bool)
    for p in range(T):
        x, y = ulam(p + 1)
        for q in range(p + 1):
            xq, yq = ulam(q + 1)
            mask[p, q] = max(abs(x - xq), abs(y - yq)) <= r
    return mask


# ---- section 5: crystalline loss -----------------------------------------------------------

def similarity(a, b):
    """s(a, b) = 0.7 gcd(a, b) / max(a, b) + 0.3 / (1 + ||u(a) - u(b)||_2)."""
    (xa, ya), (xb, yb) = ulam(a), ulam(b)
    return 0.7 * math.gcd(a, b) / max(a, b) + 0.3 / (1 + math.hypot(xa - xb, ya - yb))


def q_row(y, V):
    """(V): q_y(v) = s(v + 1, y + 1) / sum over w of s(w + 1, y + 1)."""
    s = np.array([similarity(v + 1, y + 1) for v in range(V)])
    return s / s.sum()


def crystalline_loss_forward(logits, targets, alpha):
    """logits (..., V), targets (...) in [0, V) or -1 (ignored) -> the mean over counted
    positions of (1 - alpha) (-log p_y) + alpha (-sum_v q_y(v) log p_v), and a cache."""
    shape, V = logits.shape, logits.shape[-1]
    logits, targets = logits.reshape(-1, V), np.asarray(targets).reshape(-1)
    counted = targets >= 0
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    target_mix = np.zeros_like(logits)          # (1 - alpha) onehot(y) + alpha q_y
    for n in np.flatnonzero(counted):
        target_mix[n] = alpha * q_row(targets[n], V)
        target_mix[n, targets[n]] += 1 - alpha
    loss = -(target_mix * log_p).sum() / counted.sum()
    return loss, (np.exp(log_p), target_mix, counted, shape)


def crystalline_loss_backward(dloss, cache):
    """dloss scalar -> dlogits (..., V): p - ((1 - alpha) onehot(y) + alpha q_y), over the
    number of counted positions."""
    p, target_mix, counted, shape = cache
    return ((p - target_mix) * counted[:, None] * (dloss / counted.sum())).reshape(shape)
