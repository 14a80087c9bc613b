"""AdamW over the model's flat parameter buffer, fused in the Cython core."""
from __future__ import annotations

import math

import numpy as np

from . import _core

# Work unit of the fused update: fixed, so the split of the work never depends on threads.
CHUNK = 65536


class AdamW:
    """Decoupled weight decay on 2-D weights only (embeddings and matrices), as in GPT-2
    training recipes; biases and LayerNorm parameters are not decayed."""

    def __init__(self, model, lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = np.zeros_like(model.flat)
        self.v = np.zeros_like(model.flat)
        self.step_count = 0
        rows = []
        for name, (offset, shape) in model.config.layout()[0].items():
            decay = int(len(shape) >= 2)
            size = math.prod(shape)
            rows += [(start, min(start + CHUNK, offset + size), decay)
                     for start in range(offset, offset + size, CHUNK)]
        self._ranges = np.array(rows, dtype=np.intp).reshape(-1, 3)

    def step(self, grad_flat: np.ndarray, lr: float | None = None, grad_scale: float = 1.0,
             threads: int = 1) -> None:
        """One update with gradient grad_flat * grad_scale (grad_scale < 1 clips)."""
        self.step_count += 1
        _core.adamw_step(self.model.flat, grad_flat, self.m, self.v, self._ranges,
                         self.lr if lr is None else lr, self.betas[0], self.betas[1], self.eps,
                         self.weight_decay, grad_scale, self.step_count, threads)


def clip_scale(grad_norm: float, max_norm: float) -> float:
    """The factor that brings the gradient's global norm down to max_norm (PyTorch's rule)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def grad_norm(grad_flat: np.ndarray, threads: int = 1) -> float:
    """Global L2 norm of the gradient, the same for every thread count."""
    return _core.grad_norm(grad_flat, threads)


def scheduled_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Learning rate of step `step` (1-based): linear warmup to `lr` over the first `warmup`
    steps, then cosine decay from `lr` to `min_lr`, reached at step `total_steps`."""
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total_steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
