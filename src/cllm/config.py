"""Model configuration and the layout of the one flat parameter buffer.

Each field that a user chooses on the command line declares its flag beside it (see
settings.py): one name for each setting, from the command line to the saved file."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from .argtypes import positive_int, unit_interval
from .settings import setting

# Per-layer tensors in Hugging Face GPT-2 order: (suffix, shape in terms of C, F).
LAYER_TENSORS = (
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)


# The crystalline switches (CRYSTALLINE.md sections 2 to 5): field -> allowed values.
SWITCHES = {
    "init": ("normal", "lattice"),
    "position": ("learned", "angular"),
    "attention": ("dense", "ulam"),
    "loss": ("ce", "crystalline"),
}
# The largest value of each size: far beyond any model a CPU trains, and small enough that no
# configuration can ask for an absurd allocation before anything else is checked.
LIMITS = dict(vocab_size=1 << 24, n_ctx=1 << 20, n_embd=1 << 16, n_layer=1 << 10,
              n_head=1 << 12, n_inner=1 << 18, ulam_radius=64)

# Every switch off: GPT-2 itself, and what a configuration saved before the switches existed
# means.
GPT2_SWITCHES = dict(init="normal", position="learned", attention="dense", loss="ce")


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-2 architecture with the crystalline switches. n_inner defaults to 4 * n_embd.

    init        "normal" (GPT-2's N(0, 0.02)) or "lattice" (wte from the Kronecker lattice)
    position    "learned" (the wpe table) or "angular" (q and k rotated; no wpe parameter)
    attention   "dense" (causal) or "ulam" (keys within Chebyshev distance ulam_radius on the
                Ulam spiral)
    loss        "ce" or "crystalline" (cross-entropy mixed with the GCD/Ulam similarity target,
                weight crystalline_alpha)
    A switch is on by default where the ablation (bench/ablation.py) showed that it does not
    lose: angular positions and Ulam attention. A saved configuration without the switch
    fields predates them and is GPT-2 (GPT2_SWITCHES)."""
    vocab_size: int = setting(flags=("-v", "--vocab"), type=positive_int, cli_default=10000,
                              metavar="N", help="vocabulary size")
    n_ctx: int = setting(flags=("-s", "--ctx"), type=positive_int, cli_default=256,
                         metavar="N", help="context length in tokens")
    n_embd: int = setting(flags=("-e", "--embed"), type=positive_int, cli_default=256,
                          metavar="N", help="embedding width; the feed-forward width is 4 x this")
    n_layer: int = setting(flags=("-l", "--layers"), type=positive_int, cli_default=6,
                           metavar="N", help="transformer layers")
    n_head: int = setting(flags=("-H", "--heads"), type=positive_int, cli_default=8,
                          metavar="N", help="attention heads; must divide --embed")
    n_inner: int | None = None
    tie_embeddings: bool = True
    init: str = setting("normal", flags=("--init",), choices=SWITCHES["init"],
                        help="initialisation of the token embeddings: GPT-2's normal draw or "
                             "the crystalline lattice")
    position: str = setting("angular", flags=("--position",), choices=SWITCHES["position"],
                            help="positions: a learned table, or angular rotation of queries "
                                 "and keys")
    attention: str = setting("ulam", flags=("--attention",), choices=SWITCHES["attention"],
                             help="attention: dense causal, or sparse over Ulam-spiral "
                                  "neighbours")
    ulam_radius: int = setting(2, flags=("--ulam-radius",), type=positive_int, metavar="R",
                               help="Chebyshev radius of the Ulam neighbourhood")
    loss: str = setting("ce", flags=("--loss",), choices=SWITCHES["loss"],
                        help="training loss: cross-entropy, or the crystalline GCD/Ulam label "
                             "smoothing")
    crystalline_alpha: float = setting(0.1, flags=("--crystalline-alpha",), type=unit_interval,
                                       metavar="A",
                                       help="weight of the crystalline target in the loss")

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_embd", "n_layer", "n_head"):
            _check_positive_int(name, getattr(self, name))
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        _check_positive_int("n_inner", self.n_inner)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name, allowed in SWITCHES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if self.position == "angular" and self.head_dim % 2:
            raise ValueError(f"angular positions rotate pairs of features: the head dimension "
                             f"n_embd / n_head ({self.head_dim}) must be even")
        # radius 0 would leave each position attending to itself alone
        _check_positive_int("ulam_radius", self.ulam_radius)
        for name, limit in LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be at most {limit}, got {getattr(self, name)}")
        alpha = self.crystalline_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"crystalline_alpha must be a number in [0, 1], got {alpha!r}")
        object.__setattr__(self, "crystalline_alpha", float(alpha))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model configuration keys: {sorted(unknown)}")
        return cls(**{**GPT2_SWITCHES, **d})

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter tensor, in the order of the flat buffer, with its shape."""
        V, C, F = self.vocab_size, self.n_embd, self.n_inner
        layer_shapes = {
            "ln_1.weight": (C,), "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,),
            "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,),
        }
        shapes = [("wte", (V, C))]
        if self.position == "learned":
            shapes.append(("wpe", (self.n_ctx, C)))
        for i in range(self.n_layer):
            shapes += [(f"h.{i}.{s}", layer_shapes[s]) for s in LAYER_TENSORS]
        shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
        if not self.tie_embeddings:
            shapes.append(("lm_head.weight", (V, C)))
        return shapes

    def layout(self) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
        """Name -> (offset, shape) in the flat buffer, and the buffer's total length.

        Tensors lie back to back in tensor_shapes() order, as in a .cllm file, so that a
        mapped file is itself the flat buffer."""
        offsets, pos = {}, 0
        for name, shape in self.tensor_shapes():
            offsets[name] = (pos, shape)
            pos += math.prod(shape)
        return offsets, pos

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensor_shapes())

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Name -> the tensor's view into the flat buffer (or any array laid out like it)."""
        return {name: flat[offset:offset + math.prod(shape)].reshape(shape)
                for name, (offset, shape) in self.layout()[0].items()}

    def flatten(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """A new flat float32 buffer holding the named tensors (the inverse of views)."""
        layout, size = self.layout()
        flat = np.empty(size, dtype=np.float32)
        for name, view in self.views(flat).items():
            view[...] = tensors[name]
        return flat

    def describe(self) -> str:
        """One line for people: the sizes, the switches and the parameter count."""
        return (f"vocabulary {self.vocab_size}, context {self.n_ctx}, embedding "
                f"{self.n_embd}, layers {self.n_layer}, heads {self.n_head}, "
                f"feed-forward {self.n_inner}; init {self.init}, positions {self.position}, "
                f"attention {self.attention}"
                + (f" (radius {self.ulam_radius})" if self.attention == "ulam" else "")
                + f", loss {self.loss}"
                + (f" (alpha {self.crystalline_alpha})" if self.loss == "crystalline" else "")
                + f"; {self.num_parameters():,} parameters")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
