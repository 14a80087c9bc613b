"""The model: one flat float32 parameter buffer with named views, run by the Cython core."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from . import _core, crystal
from .checkpoint import CllmFile, load_cllm, save_cllm
from .config import ModelConfig
from .generate import iter_ids, iter_text
from .threads import positive_count, usable_cores
from .tokenizer import checked_tokenizer, tokenizer_to_json


class Losses(NamedTuple):
    loss: float   # mean training loss (config.loss) over the targets that are not -1
    ce: float     # mean plain cross-entropy over them: the number that compares across settings


class Model:
    """A GPT-2 language model: its configuration, its parameters (`params`, named views into
    one flat buffer, `flat`), its tokenizer and its files. The computation is the core's
    Transformer (`core`), which owns everything else the model's operations need."""

    def __init__(self, config: ModelConfig, flat: np.ndarray | None = None, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        if flat is None:
            flat = np.zeros(config.layout()[1], dtype=np.float32)
        self.core = _core.Transformer(config, flat)   # checks the buffer's type and size
        self.flat = flat
        self.params = config.views(flat)

    @classmethod
    def create(cls, config: ModelConfig, seed: int = 0, tokenizer=None) -> "Model":
        """GPT-2 initialisation: weights N(0, 0.02), the two residual projections
        N(0, 0.02/sqrt(2 n_layer)), biases zero, LayerNorm weights one. With init="lattice",
        wte is the lattice table at scale 0.02 instead (the other weights are the same draws
        as with "normal")."""
        model = cls(config, tokenizer=tokenizer)
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, view in model.params.items():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                view[...] = 1.0
            elif name.endswith(".bias"):
                view[...] = 0.0
            else:
                std = residual_std if name.endswith("c_proj.weight") else 0.02
                view[...] = rng.standard_normal(view.shape) * std
        if config.init == "lattice":
            model.params["wte"][...] = crystal.lattice_embeddings(config.vocab_size,
                                                                  config.n_embd, 0.02)
        return model

    def save(self, path) -> None:
        """Write the model (configuration, tokenizer, parameters) as a .cllm file, atomically."""
        save_cllm(path, self.params, self.config,
                  None if self.tokenizer is None else tokenizer_to_json(self.tokenizer))

    @classmethod
    def load(cls, path, writable: bool = False, verify: bool = True) -> "Model":
        """Read a .cllm file, checking its digests unless not `verify`. The parameters are the
        mapped file itself (read-only, shared by every process that loads it) unless
        `writable`, which copies them (and so survives the file being rewritten)."""
        return cls.from_file(load_cllm(path, mmap=True, verify=verify), path, writable)

    @classmethod
    def from_file(cls, f: CllmFile, path, writable: bool = False) -> "Model":
        """The model of a .cllm file read by load_cllm from `path`."""
        flat = f.flat
        if writable or flat is None:
            flat = f.config.flatten(f.params)
        tokenizer = None if f.tokenizer_json is None else checked_tokenizer(
            f.tokenizer_json, f.config.vocab_size, str(path))
        return cls(f.config, flat, tokenizer)

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters()

    # ---- the core ----

    def _check_ids(self, name: str, a, low: int) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got {a.ndim} dimension(s)")
        B, T = a.shape
        if B < 1 or T < 1:
            raise ValueError(f"{name} must have B >= 1 and T >= 1, got shape {a.shape}")
        if T > self.config.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the context n_ctx={self.config.n_ctx}")
        lo, hi = int(a.min()), int(a.max())
        if lo < low or hi >= self.config.vocab_size:
            bad = lo if lo < low else hi
            raise ValueError(f"{name} contains {bad}, outside [{low}, {self.config.vocab_size})")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _inputs(self, idx, targets, spheres, threads):
        """The checked arguments of forward, loss and loss_and_grads."""
        idx = self._check_ids("idx", idx, 0)
        if targets is not None:
            targets = self._check_ids("targets", targets, -1)
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
        return (idx, targets, positive_count("spheres", spheres, 12),
                positive_count("threads", threads, usable_cores()))

    def forward(self, idx, spheres: int = 12, threads: int | None = None) -> np.ndarray:
        """Logits (B, T, V) for token ids idx (B, T)."""
        idx, _, spheres, threads = self._inputs(idx, None, spheres, threads)
        logits = np.empty(idx.shape + (self.config.vocab_size,), dtype=np.float32)
        self.core.forward(idx, logits, spheres, threads)
        return logits

    def loss(self, idx, targets, spheres: int = 12, threads: int | None = None) -> Losses:
        """The training loss (config.loss) and the plain cross-entropy, means over the
        targets that are not -1, without gradients."""
        return Losses(*self.core.loss(*self._inputs(idx, targets, spheres, threads)))

    def cross_entropy(self, idx, targets, spheres: int = 12, threads: int | None = None) -> float:
        """Mean plain cross-entropy over the targets that are not -1, whatever config.loss:
        the evaluation number that compares across settings."""
        return self.loss(idx, targets, spheres, threads).ce

    def loss_and_grads(self, idx, targets, spheres: int = 12, threads: int | None = None):
        """(losses, grads): the Losses of `loss` and the training loss's gradient, a dict of
        views into one flat buffer (`grad_flat`), overwritten by the next call. Bitwise
        identical for every thread count at a fixed sphere count."""
        losses = Losses(*self.core.loss_and_grads(*self._inputs(idx, targets, spheres, threads)))
        return losses, self.config.views(self.grad_flat)

    @property
    def grad_flat(self) -> np.ndarray:
        """The gradient of the last loss_and_grads call, laid out like `flat`."""
        return self.core.grad

    # ---- generation ----

    def generate_ids(self, ids, max_new_tokens: int = 50, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, threads: int | None = None) -> list[int]:
        """The new token ids after the prompt ids; temperature 0 is greedy."""
        return list(iter_ids(self, ids, max_new_tokens, temperature, top_k, top_p, seed, threads))

    def stream(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               threads: int | None = None) -> Iterator[str]:
        """The new text in pieces, as it is produced."""
        return iter_text(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, threads=threads)

    def generate(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 threads: int | None = None) -> str:
        """The new text after the prompt; the same seed gives the same text."""
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                   threads))

