"""The model architecture as the command line sees it: the flags `train` and `create` share,
the one function that turns them into a ModelConfig, and its inverse for checking flags given
beside an existing model. A new architecture flag is added here, in all three places."""
from __future__ import annotations

import argparse

from .argtypes import positive_int, unit_interval
from .config import SWITCHES, ModelConfig
from .errors import CllmError

# Destinations of the flags add_architecture_arguments defines.
ARCHITECTURE_FLAGS = ("vocab", "embed", "layers", "heads") + tuple(SWITCHES) + (
    "ulam_radius", "crystalline_alpha")
_DEFAULTS = ModelConfig(vocab_size=1, n_ctx=1, n_embd=2, n_head=1, n_layer=1)
_SWITCH_HELP = {
    "init": "initialisation of the token embeddings: GPT-2's normal draw or the crystalline "
            "lattice",
    "position": "positions: a learned table, or angular rotation of queries and keys",
    "attention": "attention: dense causal, or sparse over Ulam-spiral neighbours",
    "loss": "training loss: cross-entropy, or the crystalline GCD/Ulam label smoothing",
}


def add_architecture_arguments(parser: argparse.ArgumentParser, vocab_help: str) -> None:
    group = parser.add_argument_group("model architecture")
    group.add_argument("-v", "--vocab", type=positive_int, default=10000, metavar="N",
                       help=f"{vocab_help} (default: %(default)s)")
    group.add_argument("-e", "--embed", type=positive_int, default=256, metavar="N",
                       help="embedding width; the feed-forward width is 4 x this "
                            "(default: %(default)s)")
    group.add_argument("-l", "--layers", type=positive_int, default=6, metavar="N",
                       help="transformer layers (default: %(default)s)")
    group.add_argument("-H", "--heads", type=positive_int, default=8, metavar="N",
                       help="attention heads; must divide --embed (default: %(default)s)")
    group = parser.add_argument_group("crystalline components (CRYSTALLINE.md; the defaults "
                                      "follow the ablation)")
    for name, values in SWITCHES.items():
        group.add_argument(f"--{name}", choices=values, default=getattr(_DEFAULTS, name),
                           help=f"{_SWITCH_HELP[name]} (default: %(default)s)")
    group.add_argument("--ulam-radius", type=positive_int, default=_DEFAULTS.ulam_radius,
                       metavar="R", help="Chebyshev radius of the Ulam neighbourhood "
                       "(default: %(default)s)")
    group.add_argument("--crystalline-alpha", type=unit_interval,
                       default=_DEFAULTS.crystalline_alpha, metavar="A",
                       help="weight of the crystalline target in the loss (default: "
                            "%(default)s)")


def check_architecture(args: argparse.Namespace) -> None:
    """Refuse flags no model can have, before any work is done."""
    if args.embed % args.heads:
        raise CllmError(f"-e/--embed ({args.embed}) must be divisible by -H/--heads "
                        f"({args.heads})")
    if args.position == "angular" and (args.embed // args.heads) % 2:
        raise CllmError(f"--position angular rotates pairs of features: the head width "
                        f"-e/-H ({args.embed}/{args.heads}) must be even")


def model_config(args: argparse.Namespace, vocab_size: int, n_ctx: int) -> ModelConfig:
    """The configuration the architecture flags describe, for a vocabulary and context."""
    return ModelConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_embd=args.embed,
                       n_layer=args.layers, n_head=args.heads, n_inner=4 * args.embed,
                       init=args.init, position=args.position, attention=args.attention,
                       ulam_radius=args.ulam_radius, loss=args.loss,
                       crystalline_alpha=args.crystalline_alpha)


def architecture_args(config: ModelConfig) -> dict:
    """The architecture flags that describe `config`: the inverse of model_config."""
    return {"vocab": config.vocab_size, "embed": config.n_embd, "layers": config.n_layer,
            "heads": config.n_head, "init": config.init, "position": config.position,
            "attention": config.attention, "ulam_radius": config.ulam_radius,
            "loss": config.loss, "crystalline_alpha": config.crystalline_alpha}


def check_agrees(args: argparse.Namespace, explicit: set[str], given: dict, source: str) -> None:
    """Flags the user typed must not contradict the values `given` by an existing model or
    checkpoint (named by `source`): the run takes those, and silently ignoring a flag the
    user typed would train something other than what was asked for."""
    for name, value in given.items():
        if name in explicit and getattr(args, name) != value:
            flag = "--" + name.replace("_", "-")
            raise CllmError(f"{flag} {getattr(args, name)} contradicts {source}, which has "
                            f"{value}; leave {flag} out to use the model's")


def describe(config: ModelConfig) -> str:
    return (f"vocabulary {config.vocab_size}, context {config.n_ctx}, embedding "
            f"{config.n_embd}, layers {config.n_layer}, heads {config.n_head}, "
            f"feed-forward {config.n_inner}; init {config.init}, positions {config.position}, "
            f"attention {config.attention}"
            + (f" (radius {config.ulam_radius})" if config.attention == "ulam" else "")
            + f", loss {config.loss}"
            + (f" (alpha {config.crystalline_alpha})" if config.loss == "crystalline" else "")
            + f"; {config.num_parameters():,} parameters")
