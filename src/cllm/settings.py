"""Settings declared once: a dataclass field carries its command-line flag, type, default and
help, and the parsers, the saved checkpoints and the agreement checks are derived from it.

ModelConfig (config.py) declares the architecture this way and TrainConfig, here, everything
else a training run is given. A checkpoint stores both by field name, so renaming a flag
changes nothing in the files.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .argtypes import (fraction, non_negative_float, non_negative_int, positive_float,
                       positive_int)
from .errors import CllmError

# What a training setting is to a resumed run:
FIXED = "fixed"   # fixes what the run trains: a flag given on --resume must agree with it
RUN = "run"       # the checkpoint's value, unless the flag is given again (at a price in exactness)
PLACE = "place"   # where things are and how fast they run: always the value given now

DEFAULT_SEED = 1337


def setting(default=dataclasses.MISSING, *, flags: tuple[str, ...], help: str, type=None,
            choices=None, metavar=None, cli_default=None, role: str = RUN, action=None,
            most=None):
    """A dataclass field with its command-line flag. `cli_default` is the flag's default where
    the field itself has none (a model's sizes); `role` says what --resume does with it;
    `most`, the largest value a run may be given (so that no saved setting can ask for an
    absurd amount of work or memory)."""
    return field(default=default, metadata=dict(
        flags=flags, help=help, type=type, choices=choices, metavar=metavar, role=role,
        action=action, cli_default=default if cli_default is None else cli_default,
        most=most))


def flagged_fields(cls, skip: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flags" in f.metadata and f.name not in skip]


def add_arguments(group, cls, skip: tuple[str, ...] = (), **help_overrides: str) -> None:
    """Add the flag of every field of the dataclass `cls` (but `skip`) to an argparse group;
    the destination is the field's name."""
    for f in flagged_fields(cls, skip):
        meta = f.metadata
        default = meta["cli_default"]
        text = help_overrides.get(f.name, meta["help"])
        if default is not dataclasses.MISSING and default is not None and not meta["action"]:
            text += " (default: %(default)s)"
        kwargs = dict(dest=f.name, help=text)
        if meta["action"]:
            kwargs.update(action=meta["action"])
        else:
            kwargs.update(type=meta["type"], choices=meta["choices"], metavar=meta["metavar"])
            if default is dataclasses.MISSING:
                kwargs.update(required=True)
            else:
                kwargs.update(default=default)
        group.add_argument(*meta["flags"], **kwargs)


def flag_of(cls, name: str) -> str:
    return dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(name)
                                   ].metadata["flags"][-1]


def check_agrees(cls, given: dict, explicit: set[str], values: dict, source: str) -> None:
    """Flags the user typed (`explicit` field names, values in `given`) must not contradict
    the `values` of an existing model or checkpoint (named by `source`): the run takes those,
    and silently ignoring a flag the user typed would train something other than what was
    asked for."""
    for name, value in values.items():
        if name in explicit and given[name] != value:
            flag = flag_of(cls, name)
            raise CllmError(f"{flag} {given[name]} contradicts {source}, which has {value}; "
                            f"leave {flag} out to use the model's")


def _beyond_most(f: dataclasses.Field, value) -> bool:
    return f.metadata["most"] is not None and value is not None and value > f.metadata["most"]


@dataclass
class TrainConfig:
    """Everything `cllm train` is given besides the architecture (ModelConfig)."""
    data: str = setting(flags=("-d", "--data"), role=PLACE, metavar="DIR",
                        help="folder of text files, read recursively")
    checkpoint: str = setting("./checkpoints", flags=("-c", "--checkpoint"), role=PLACE,
                              metavar="DIR", help="folder for checkpoints and every output")
    # the vocabulary and the sequences
    vocab: int = setting(10000, flags=("-v", "--vocab"), type=positive_int, metavar="N",
                         most=1 << 24,
                         role=FIXED, help="largest vocabulary of the BPE tokenizer")
    seq_len: int = setting(128, flags=("-s", "--seq-len"), type=positive_int, metavar="N",
                           most=1 << 20,
                           role=FIXED, help="tokens per training sequence; the model's context "
                                            "is twice this")
    tokenizer: str = setting("bpe", flags=("--tokenizer",), choices=("bpe", "char"), role=FIXED,
                             help="byte-level BPE trained on the corpus, or one token per "
                                  "character")
    # the optimisation
    epochs: int = setting(10, flags=("-E", "--epochs"), type=positive_int, metavar="N",
                          most=1 << 20,
                          help="passes over the training split, in steps of -b x -s tokens")
    max_steps: int | None = setting(None, most=1 << 40, flags=("--max-steps",), type=positive_int,
                                    metavar="N", help="train this many steps, whatever "
                                                      "--epochs says")
    batch: int = setting(32, most=1 << 16, flags=("-b", "--batch"), type=positive_int, metavar="N",
                         help="sequences per step")
    lr: float = setting(1e-4, flags=("-r", "--lr"), type=positive_float, metavar="RATE",
                        help="peak learning rate")
    min_lr: float | None = setting(None, flags=("--min-lr",), type=non_negative_float,
                                   metavar="RATE", help="learning rate at the last step, "
                                   "reached by cosine decay (default: --lr / 10)")
    warmup: int = setting(100, flags=("--warmup",), type=non_negative_int, metavar="STEPS",
                          most=1 << 40,
                          help="steps of linear warmup to --lr")
    weight_decay: float = setting(0.1, flags=("--weight-decay",), type=non_negative_float,
                                  metavar="W", help="AdamW weight decay, on 2-D weights only")
    beta1: float = setting(0.9, flags=("--beta1",), type=fraction, metavar="B",
                           help="AdamW beta1")
    beta2: float = setting(0.95, flags=("--beta2",), type=fraction, metavar="B",
                           help="AdamW beta2")
    grad_clip: float = setting(1.0, flags=("--grad-clip",), type=non_negative_float,
                               metavar="NORM", help="largest global gradient norm, 0 for none")
    seed: int = setting(DEFAULT_SEED, flags=("--seed",), type=non_negative_int,
                        help="seed of the initial weights and of the data order")
    threads: int = setting(0, flags=("-t", "--threads"), type=non_negative_int, metavar="N",
                           most=1 << 10,
                           role=PLACE, help="threads, 0 for every usable core")
    spheres: int = setting(12, most=1 << 12, flags=("--spheres",), type=positive_int, metavar="N",
                           help="parts each batch is split into; the result depends on it, not "
                                "on --threads")
    # evaluation and checkpoints
    val_fraction: float = setting(0.1, flags=("--val-fraction",), type=fraction, metavar="F",
                                  help="share of the token stream, at its end, held out for "
                                       "validation")
    eval_every: int = setting(500, most=1 << 40, flags=("--eval-every",), type=non_negative_int,
                              metavar="STEPS", help="steps between validation losses, 0 for "
                                                    "none before the final one")
    eval_batches: int = setting(20, flags=("--eval-batches",), type=positive_int, metavar="N",
                                most=1 << 16,
                                help="batches of random validation windows per evaluation")
    checkpoint_every: int = setting(1000, flags=("--checkpoint-every",), type=positive_int,
                                    most=1 << 40,
                                    metavar="STEPS", help="steps between checkpoints")
    keep_checkpoints: int = setting(3, flags=("--keep-checkpoints",), type=positive_int,
                                    most=1 << 20,
                                    metavar="N", help="newest checkpoints kept, older ones "
                                                      "deleted")
    resume: bool = setting(False, flags=("--resume",), action="store_true", role=PLACE,
                           help="continue from the newest valid checkpoint in --checkpoint")
    init_from: str | None = setting(None, flags=("--init-from",), metavar="FILE.cllm",
                                    role=PLACE, help="start from this model's weights (and "
                                    "tokenizer, if it has one)")
    processes: int = setting(1, flags=("--processes",), type=positive_int, metavar="N",
                             most=1 << 16,
                             role=PLACE, help="train on N processes of this machine through "
                             "mpiexec (the recursive level; --threads is per process; the "
                             "result is that of one process)")
    accept_changed_data: bool = setting(False, flags=("--accept-changed-data",),
                                        action="store_true", role=PLACE,
                                        help="with --resume: continue although the corpus "
                                             "differs from the one the checkpoint trained on")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_saved(cls, saved: dict) -> dict:
        """The fields of a checkpoint's saved settings (checkpoints written before TrainConfig
        saved the command line's arguments, whose training names are the same): unknown names,
        such as those old files' architecture arguments, are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {name: value for name, value in saved.items() if name in names}

    @classmethod
    def check_saved(cls, saved: dict) -> None:
        """Raise ValueError naming the first saved setting whose value its flag would not
        accept (a damaged or hand-edited checkpoint)."""
        for f in flagged_fields(cls):
            if f.name not in saved:
                continue
            value, meta = saved[f.name], f.metadata
            if value is None and f.default is None:
                continue
            if meta["action"] == "store_true":
                ok = isinstance(value, bool)
            elif meta["choices"] is not None:
                ok = value in meta["choices"]
            elif meta["type"] is None:
                ok = isinstance(value, str)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                try:
                    ok = ok and meta["type"](str(value)) == value
                except argparse.ArgumentTypeError:
                    ok = False
            if not ok or _beyond_most(f, value):
                raise ValueError(f"the saved setting {f.name} = {value!r} is not a value "
                                 f"{meta['flags'][-1]} accepts")

    def __post_init__(self):
        for f in flagged_fields(TrainConfig):
            if _beyond_most(f, getattr(self, f.name)):
                raise ValueError(f"{f.metadata['flags'][-1]} must be at most "
                                 f"{f.metadata['most']}, got {getattr(self, f.name)}")

    def role_values(self, role: str) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["role"] == role}

    def resumed(self, saved: dict, explicit: set[str]) -> "TrainConfig":
        """The checkpoint's settings with the flags given now on top. The fixed ones may not
        change; the others (steps, rates...) may, at the price of exactness; where the data
        and outputs are and how many threads run change nothing in the result."""
        saved = self.from_saved(saved)
        check_agrees(TrainConfig, vars(self), explicit,
                     {name: saved[name] for name in self.role_values(FIXED) if name in saved},
                     "the checkpoint")
        merged = {**dataclasses.asdict(self), **saved}
        merged.update({name: getattr(self, name) for name in explicit if name in merged})
        merged.update(self.role_values(PLACE))
        return TrainConfig(**merged)
