"""The training step: loss and gradients, the gradient norm and clipping, the scheduled
learning rate, and AdamW over the model's flat parameter buffer (fused in the core)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _core
from .errors import NonFiniteError
from .threads import positive_count, usable_cores


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

    def step(self, grad_flat: np.ndarray, lr: float | None = None, grad_scale: float = 1.0,
             threads: int = 1) -> None:
        """One update with gradient grad_flat * grad_scale (grad_scale < 1 clips)."""
        self.step_count += 1
        self.model.core.adamw_step(grad_flat, self.m, self.v, self.lr if lr is None else lr,
                                   self.betas[0], self.betas[1], self.eps, self.weight_decay,
                                   grad_scale, self.step_count, threads)


@dataclass(frozen=True)
class Schedule:
    """Linear warmup to `lr` over the first `warmup` steps, then cosine decay from `lr` to
    `min_lr`, reached at step `total_steps`."""
    lr: float
    min_lr: float
    warmup: int
    total_steps: int

    def rate(self, step: int) -> float:
        """The learning rate of step `step` (1-based)."""
        return scheduled_lr(step, self.total_steps, self.lr, self.min_lr, self.warmup)


class StepResult(NamedTuple):
    loss: float       # mean training loss of the batch (config.loss)
    ce: float         # its mean plain cross-entropy
    grad_norm: float  # global gradient norm before clipping
    lr: float         # the learning rate the step used


def train_step(model, optimizer: AdamW, schedule: Schedule, x, y, grad_clip: float = 1.0,
               spheres: int = 12, threads: int | None = None, group=None) -> StepResult:
    """One training step on the batch (x, y): loss and gradients over the spheres, the
    gradient's norm, clipping to grad_clip (0: none), and AdamW at the scheduled rate of the
    optimizer's next step. The same for every thread count, bit for bit. A loss or norm that
    is not finite raises NonFiniteError before the optimizer touches the weights. With a
    parallel.ProcessGroup, this process runs its block of the spheres and the result is the
    same as one process's, on every rank."""
    threads = positive_count("threads", threads, usable_cores())
    if group is None:
        (loss, ce), _ = model.loss_and_grads(x, y, spheres=spheres, threads=threads)
    else:
        loss, ce = group.loss_and_grads(model, x, y, spheres, threads)
    norm = model.core.grad_norm(threads)
    step = optimizer.step_count + 1
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteError(f"step {step}: the training loss is {loss:g} and the "
                             f"gradient norm {norm:g}; the weights were left as they were "
                             f"after step {step - 1}")
    lr = schedule.rate(step)
    optimizer.step(model.grad_flat, lr=lr, grad_scale=clip_scale(norm, grad_clip),
                   threads=threads)
    return StepResult(loss, ce, norm, lr)


def clip_scale(grad_norm: float, max_norm: float) -> float:
    """The factor that brings the gradient's global norm down to max_norm (PyTorch's rule)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def grad_norm(grad_flat: np.ndarray, threads: int = 1) -> float:
    """Global L2 norm of a gradient, the same for every thread count."""
    return _core.grad_norm(grad_flat, threads)


def scheduled_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Learning rate of step `step` (1-based): linear warmup to `lr` over the first `warmup`
    steps, then cosine decay from `lr` to `min_lr`, reached at step `total_steps`."""
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total_steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
