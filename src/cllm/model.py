"""The model: one flat float32 parameter buffer with named views, run by the Cython core."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from . import _core, crystal
from .checkpoint import CllmFile, load_cllm, save_cllm
from .config import ModelConfig
from .generate import iter_batch, iter_text
from .quantize import decoder_matrices, quantize_tensors
from .threads import positive_count, usable_cores
from .tokenizer import checked_tokenizer, decode, encode, tokenizer_to_json


# Prompts decoded together at most: each holds a key/value cache of the whole context, and
# past this many a step is bound by arithmetic, not by reading the weights.
MAX_BATCH = 16


class Losses(NamedTuple):
    loss: float   # mean training loss (config.loss) over the targets that are not -1
    ce: float     # mean plain cross-entropy over them: the number that compares across settings


class Model:
    """A GPT-2 language model: its configuration, its parameters (`params`, named views into
    one flat buffer, `flat`), its tokenizer and its files. The computation is the core's
    Transformer (`core`), which owns everything else the model's operations need.

    A model whose matrices are quantized for generation (`weight_format` "bf16" or "int8", made
    by `quantized` or loaded) holds them in `quantized_tensors` (the tensors of its file) and
    only the small float32 tensors (LayerNorms, biases, wpe) in `params`: it generates, and its
    forward and losses work, but it does not train."""

    def __init__(self, config: ModelConfig, flat: np.ndarray | None = None, tokenizer=None,
                 weights: str = "float32", quantized_tensors: dict | None = None):
        self.config = config
        self.tokenizer = tokenizer
        quantized = weights != "float32"
        if flat is None:
            flat = np.zeros(config.layout()[1], dtype=np.float32)
        self.core = _core.Transformer(config, flat)   # checks the buffer's type and size
        self.flat = flat
        self.params = config.views(flat)
        self.quantized_tensors = quantized_tensors if quantized else None
        if quantized:
            # the small tensors go into the flat buffer, whose matrix regions stay unused
            self.params = {name: view for name, view in self.params.items()
                           if name in quantized_tensors}
            for name, view in self.params.items():
                view[...] = quantized_tensors[name]
            self.core.use_weights(weights, decoder_matrices(config, quantized_tensors, weights))

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
        tokenizer_json = None if self.tokenizer is None else tokenizer_to_json(self.tokenizer)
        if self.quantized_tensors is None:
            save_cllm(path, self.params, self.config, tokenizer_json)
        else:
            save_cllm(path, self.quantized_tensors, self.config, tokenizer_json,
                      weights=self.weight_format)

    @property
    def weight_format(self) -> str:
        """"float32", or "bf16" or "int8" for a model quantized for generation."""
        return self.core.weight_format

    def quantized(self, to: str) -> "Model":
        """A copy of this model for generation with its matrices in `to` ("bf16" or "int8"):
        every matrix generation reads, the output head included; the small tensors stay
        float32."""
        if self.quantized_tensors is not None:
            raise ValueError(f"this model is already quantized ({self.weight_format}): "
                             f"quantize the float32 model it came from")
        return Model(self.config, tokenizer=self.tokenizer, weights=to,
                     quantized_tensors=quantize_tensors(self.config, self.params, to))

    @classmethod
    def load(cls, path, writable: bool = False, verify: bool = True) -> "Model":
        """Read a .cllm file, checking its digests unless not `verify`. The parameters are the
        mapped file itself (read-only, shared by every process that loads it) unless
        `writable`, which copies them (and so survives the file being rewritten)."""
        return cls.from_file(load_cllm(path, mmap=True, verify=verify), path, writable)

    @classmethod
    def from_file(cls, f: CllmFile, path, writable: bool = False) -> "Model":
        """The model of a .cllm file read by load_cllm from `path`."""
        tokenizer = None if f.tokenizer_json is None else checked_tokenizer(
            f.tokenizer_json, f.config.vocab_size, str(path))
        if f.weights != "float32":
            tensors = {name: np.array(a) if writable else a for name, a in f.params.items()}
            return cls(f.config, tokenizer=tokenizer, weights=f.weights,
                       quantized_tensors=tensors)
        flat = f.flat
        if writable or flat is None:
            flat = f.config.flatten(f.params)
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
        if self.quantized_tensors is not None:
            return np.stack(list(self._decoded_logits(idx, threads)))
        logits = np.empty(idx.shape + (self.config.vocab_size,), dtype=np.float32)
        self.core.forward(idx, logits, spheres, threads)
        return logits

    def _decoded_logits(self, idx: np.ndarray, threads: int):
        """The logits (T, V) of each sequence of idx, read by the generation decoder: the
        forward of a quantized model."""
        decoder = self.core.decoder(threads)
        for row in idx:
            yield decoder.read(row, every=True)

    def loss(self, idx, targets, spheres: int = 12, threads: int | None = None) -> Losses:
        """The training loss (config.loss) and the plain cross-entropy, means over the
        targets that are not -1, without gradients."""
        idx, targets, spheres, threads = self._inputs(idx, targets, spheres, threads)
        if self.quantized_tensors is None:
            return Losses(*self.core.loss(idx, targets, spheres, threads))
        # a sequence at a time, through the core's own loss kernels, sums in sequence order
        n_targets = int((targets >= 0).sum())
        if n_targets == 0:
            raise ValueError("targets has no token to predict: every entry is -1")
        crystalline = self.config.loss == "crystalline"
        ulam_xy = crystal.ulam_points(self.config.vocab_size) if crystalline else None
        total = ce = 0.0
        for logits, row in zip(self._decoded_logits(idx, threads), targets):
            if crystalline:
                loss, row_ce, _ = _core.layer_crystalline(logits, row, ulam_xy,
                                                          self.config.crystalline_alpha, 0.0)
            else:
                loss, _ = _core.layer_crossentropy(logits, row, 0.0)
                row_ce = loss
            total += loss
            ce += row_ce
        return Losses(total / n_targets, ce / n_targets)

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
                     seed: int | None = None, threads: int | None = None):
        """The new token ids after the prompt ids (a list of ints), or after each prompt of a
        list of them, decoded together MAX_BATCH at a time (a list of lists); temperature 0 is
        greedy."""
        batch = len(ids) > 0 and all(isinstance(p, (list, tuple, np.ndarray)) for p in ids)
        prompts = [list(p) for p in ids] if batch else [ids]
        new = []
        for start in range(0, len(prompts), MAX_BATCH):
            group = prompts[start:start + MAX_BATCH]
            steps = list(iter_batch(self, group, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=None if seed is None else seed + start,
                                    threads=threads))
            new += [[step[i] for step in steps] for i in range(len(group))]
        return new if batch else new[0]

    def stream(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               threads: int | None = None) -> Iterator[str]:
        """The new text in pieces, as it is produced."""
        return iter_text(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, threads=threads)

    def generate(self, prompt, max_new_tokens: int = 50, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 threads: int | None = None):
        """The new text after the prompt (a str); or, for a list of prompts decoded together,
        the list of their texts. The same seed gives the same text."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                       threads))
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: give token ids to generate_ids "
                             "instead")
        prompts = list(prompt)
        if not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("prompts must be non-empty strings")
        ids = self.generate_ids([encode(self.tokenizer, p) for p in prompts], max_new_tokens,
                                temperature, top_k, top_p, seed, threads)
        return [decode(self.tokenizer, new) for new in ids]
