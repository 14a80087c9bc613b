"""The architecture as the command line gives it: the ModelConfig fields that have flags
(config.py declares each flag beside its field), and the checks of how they relate, in the
flags' words."""
from __future__ import annotations

import argparse

from .config import ModelConfig
from .errors import CllmError
from .settings import add_arguments, flagged_fields

# `cllm train` derives these two: the vocabulary from the tokenizer, the context from --seq-len.
DERIVED_IN_TRAINING = ("vocab_size", "n_ctx")


def add_architecture_arguments(parser: argparse.ArgumentParser,
                               skip: tuple[str, ...] = (), **help_overrides: str) -> None:
    add_arguments(parser.add_argument_group("model architecture (crystalline components: "
                                            "CRYSTALLINE.md; the defaults follow the ablation)"),
                  ModelConfig, skip, **help_overrides)


def chosen_architecture(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The architecture fields given by the flags (ModelConfig field name -> value)."""
    return {f.name: getattr(args, f.name) for f in flagged_fields(ModelConfig, skip)}


def check_architecture(fields: dict) -> None:
    """Refuse flags no model can have, before any work is done."""
    embed, heads = fields["n_embd"], fields["n_head"]
    if embed % heads:
        raise CllmError(f"-e/--embed ({embed}) must be divisible by -H/--heads ({heads})")
    if fields["position"] == "angular" and (embed // heads) % 2:
        raise CllmError(f"--position angular rotates pairs of features: the head width "
                        f"-e/-H ({embed}/{heads}) must be even")
