"""The model: one flat float32 parameter buffer with named views, run by the Cython core."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from . import _core, crystal
from .checkpoint import load_cllm, save_cllm
from .config import LAYER_TENSORS, ModelConfig
from .generate import iter_ids, iter_text
from .threads import blas_single_threaded, usable_cores
from .tokenizer import tokenizer_from_json, tokenizer_to_json


class Model:
    """A GPT-2 language model. `params` are views into one flat buffer (`flat`)."""

    def __init__(self, config: ModelConfig, flat: np.ndarray | None = None, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self._layout, size = config.layout()
        if flat is None:
            flat = np.zeros(size, dtype=np.float32)
        if flat.dtype != np.float32 or flat.shape != (size,):
            raise ValueError(f"flat parameter buffer must be float32 of shape ({size},)")
        self.flat = flat
        self.params = self._views(flat)
        self._sphere_grads = np.zeros((0, size), dtype=np.float32)
        self._workspaces: dict[tuple, list] = {}
        # plain cross-entropy of the last loss / loss_and_grads call: with loss="crystalline"
        # the training loss differs from it, and this is the number that compares across settings
        self.last_ce: float | None = None
        offsets = {name: off for name, (off, _) in self._layout.items()}
        self._dims = dict(
            V=config.vocab_size, C=config.n_embd, F=config.n_inner, L=config.n_layer,
            H=config.n_head, n_ctx=config.n_ctx, tied=int(config.tie_embeddings),
            wte=offsets["wte"], wpe=offsets.get("wpe", -1), lnf_w=offsets["ln_f.weight"],
            lnf_b=offsets["ln_f.bias"],
            head=offsets["wte" if config.tie_embeddings else "lm_head.weight"],
            angular=int(config.position == "angular"), ulam=int(config.attention == "ulam"),
            crystalline=int(config.loss == "crystalline"), alpha=config.crystalline_alpha)
        if self._dims["angular"]:
            cos, sin = crystal.angular_tables(config.n_ctx, config.n_head, config.head_dim)
            half = config.n_embd // 2
            self._dims["rot_cos"] = cos.reshape(config.n_ctx, half).astype(np.float32)
            self._dims["rot_sin"] = sin.reshape(config.n_ctx, half).astype(np.float32)
        if self._dims["ulam"]:
            self._dims["ulam_start"], self._dims["ulam_keys"] = crystal.ulam_neighbours(
                config.n_ctx, config.ulam_radius)
        if self._dims["crystalline"]:
            self._dims["ulam_xy"] = crystal.ulam_points(config.vocab_size)
        self._layer_offsets = np.array(
            [[offsets[f"h.{i}.{t}"] for t in LAYER_TENSORS] for i in range(config.n_layer)],
            dtype=np.intp).reshape(config.n_layer, len(LAYER_TENSORS))

    def _views(self, flat: np.ndarray) -> OrderedDict:
        return OrderedDict((name, flat[off:off + math.prod(shape)].reshape(shape))
                           for name, (off, shape) in self._layout.items())

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
    def load(cls, path, writable: bool = False) -> "Model":
        """Read a .cllm file. The parameters are the mapped file itself (read-only, shared by
        every process that loads it) unless `writable`, which copies them."""
        f = load_cllm(path, mmap=True)
        flat = f.flat
        if writable or flat is None:
            flat = np.empty(f.config.layout()[1], dtype=np.float32)
            for name, (offset, shape) in f.config.layout()[0].items():
                flat[offset:offset + math.prod(shape)] = f.params[name].reshape(-1)
        tokenizer = None if f.tokenizer_json is None else tokenizer_from_json(f.tokenizer_json)
        return cls(f.config, flat, tokenizer)

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters()

    # ---- input checks ----

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

    @staticmethod
    def _check_count(name: str, value, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return int(value)

    def _prepare(self, idx, targets, spheres, threads):
        idx = self._check_ids("idx", idx, 0)
        if targets is not None:
            targets = self._check_ids("targets", targets, -1)
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
        spheres = self._check_count("spheres", spheres, 12)
        threads = self._check_count("threads", threads, usable_cores())
        return idx, targets, spheres, threads

    # ---- the core ----

    def _workspaces_for(self, B: int, T: int, spheres: int, threads: int, backward: bool):
        """Thread-local activation workspaces, allocated once per batch shape and reused."""
        nb = -(-B // spheres)
        key = (nb, T, threads, backward)
        if key not in self._workspaces:
            if len(self._workspaces) >= 4:  # a run uses a few shapes (train, eval, last batch)
                self._workspaces.pop(next(iter(self._workspaces)))
            self._workspaces[key] = [_core.Workspace(self._dims, nb, T, backward)
                                     for _ in range(threads)]
        return self._workspaces[key]

    def _run(self, idx, targets, spheres, threads, mode, logits=None):
        B, T = idx.shape
        active = min(spheres, B)
        backward = mode == _core.Mode.MODE_GRADS
        if backward and self._sphere_grads.shape[0] < active:
            self._sphere_grads = np.zeros((active, self.flat.size), dtype=np.float32)
        n_targets = 0 if targets is None else int(np.count_nonzero(targets >= 0))
        if mode != _core.Mode.MODE_LOGITS and n_targets == 0:
            raise ValueError("targets has no token to predict: every entry is -1")
        workspaces = self._workspaces_for(B, T, spheres, threads, backward)
        dummy3 = np.zeros((1, 1, 1), dtype=np.float32)
        with blas_single_threaded():
            losses = _core.run_spheres(
                self._dims, self._layer_offsets, self.flat,
                self._sphere_grads if backward else np.zeros((1, 1), dtype=np.float32),
                workspaces, idx, idx if targets is None else targets,
                dummy3 if logits is None else logits, spheres, threads, mode, n_targets)
        if backward:
            _core.reduce_spheres(self._sphere_grads, active, threads)
        # the losses: sphere sums added in sphere order, over the number of target tokens
        total = ce = 0.0
        for s in range(active):
            total += float(losses[s, 0])
            ce += float(losses[s, 1])
        if mode != _core.Mode.MODE_LOGITS:
            self.last_ce = ce / n_targets
        return total / n_targets if n_targets else 0.0

    def forward(self, idx, spheres: int = 12, threads: int | None = None) -> np.ndarray:
        """Logits (B, T, V) for token ids idx (B, T)."""
        idx, _, spheres, threads = self._prepare(idx, None, spheres, threads)
        logits = np.empty(idx.shape + (self.config.vocab_size,), dtype=np.float32)
        self._run(idx, None, spheres, threads, _core.Mode.MODE_LOGITS, logits)
        return logits

    def loss(self, idx, targets, spheres: int = 12, threads: int | None = None) -> float:
        """Mean training loss (config.loss) over the targets that are not -1, without
        gradients; the plain cross-entropy is left in `last_ce`."""
        idx, targets, spheres, threads = self._prepare(idx, targets, spheres, threads)
        return self._run(idx, targets, spheres, threads, _core.Mode.MODE_LOSS)

    def cross_entropy(self, idx, targets, spheres: int = 12, threads: int | None = None) -> float:
        """Mean plain cross-entropy over the targets that are not -1, whatever config.loss:
        the evaluation number that compares across settings."""
        self.loss(idx, targets, spheres, threads)
        return self.last_ce

    def loss_and_grads(self, idx, targets, spheres: int = 12, threads: int | None = None):
        """(loss, grads): the mean training loss (config.loss) over the targets that are not -1
        and its gradient, a dict of views into one flat buffer (`grad_flat`), overwritten by
        the next call; the plain cross-entropy is left in `last_ce`. Bitwise identical for
        every thread count at a fixed sphere count."""
        idx, targets, spheres, threads = self._prepare(idx, targets, spheres, threads)
        loss = self._run(idx, targets, spheres, threads, _core.Mode.MODE_GRADS)
        return loss, self._views(self.grad_flat)

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

    @property
    def grad_flat(self) -> np.ndarray:
        """The reduced gradient of the last loss_and_grads call."""
        return self._sphere_grads[0]
