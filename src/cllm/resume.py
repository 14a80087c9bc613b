"""Training checkpoints: what one holds beyond the model, writing it, and finding the newest
one a run can resume from.

A checkpoint is a .cllm file with the AdamW moments and a `training` object:

    step           steps done
    corpus         what the dataset was built from (data.corpus_record): the file list with
                   sizes and the dataset's digest, checked by `--resume`
    rng            state of the generator that draws the training windows (PCG64, as JSON)
    best_val_loss  lowest validation loss so far (null before the first evaluation)
    elapsed        seconds of training so far, over every run that led here
    settings       the run's TrainConfig by field name, so that `--resume` continues the same
                   run (checkpoints written before it hold `args`, the command line's
                   arguments, whose training names are the same)

With these, a resumed run repeats exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import (checkpoint_path, list_checkpoints, load_float32_cllm, prune_checkpoints,
                         save_cllm)
from .errors import CheckpointError, CllmError
from .model import Model
from .optim import AdamW
from .settings import TrainConfig
from .tokenizer import tokenizer_to_json


@dataclass
class TrainingState:
    step: int
    rng: np.random.Generator
    best_val_loss: float | None
    elapsed: float
    corpus: dict | None = None    # data.corpus_record of the run's dataset; None before 0.2


@dataclass
class Checkpoint:
    path: Path
    model: Model
    moments: dict[str, np.ndarray]  # "m" and "v" as flat buffers like model.flat
    state: TrainingState
    settings: dict   # TrainConfig fields by name


def save_checkpoint(folder: str | os.PathLike, model: Model, optimizer: AdamW,
                    state: TrainingState, run: TrainConfig) -> Path:
    """Write checkpoint_step_<step>.cllm atomically, then delete all but the
    run.keep_checkpoints newest."""
    path = checkpoint_path(folder, state.step)
    training = dict(step=state.step, rng=state.rng.bit_generator.state,
                    best_val_loss=state.best_val_loss, elapsed=state.elapsed,
                    settings=dataclasses.asdict(run), corpus=state.corpus)
    moments = {"m": model.config.views(optimizer.m), "v": model.config.views(optimizer.v)}
    save_cllm(path, model.params, model.config, tokenizer_to_json(model.tokenizer), moments,
              training)
    prune_checkpoints(folder, run.keep_checkpoints)
    return path


def newest_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """The newest checkpoint in `folder` that loads completely. Damaged ones newer than it are
    skipped with a warning; if none loads, the error says why the newest does not."""
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"{folder}: no checkpoint_step_N.cllm to resume from")
    problems = []
    for _, path in found:
        try:
            checkpoint = load_checkpoint(path)
        except CllmError as e:  # CheckpointError, or DataError for a broken stored tokenizer
            problems.append(str(e))
            continue
        except Exception as e:  # whatever else a damaged file causes: it is not resumed from
            problems.append(f"{path}: {type(e).__name__}: {' '.join(str(e).split())}")
            continue
        for problem in problems:
            print(f"warning: skipping a damaged checkpoint: {problem}", file=sys.stderr)
        return checkpoint
    older = f" (and the {len(found) - 1} older ones cannot be used either)" if len(found) > 1 else ""
    raise CheckpointError(f"cannot resume: {problems[0]}{older}")


def load_checkpoint(path: Path) -> Checkpoint:
    f = load_float32_cllm(path, "train from")
    training = f.training
    if f.optimizer is None or not isinstance(training, dict) or f.tokenizer_json is None:
        raise CheckpointError(f"{path}: not a training checkpoint (a model file without the "
                              f"optimizer state, training state or tokenizer a run needs)")
    try:
        step, best, elapsed = training["step"], training["best_val_loss"], training["elapsed"]
        settings = training["settings"] if "settings" in training else training["args"]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = training["rng"]
        corpus = training.get("corpus")
        if not isinstance(settings, dict):
            raise TypeError("the settings are not a JSON object")
        TrainConfig.check_saved(settings)
        if corpus is not None:
            _check_corpus_record(corpus)
    except (KeyError, TypeError, ValueError, OverflowError) as e:  # Overflow: the RNG state
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}: {e})") from e
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0
            and _is_number(elapsed) and (best is None or _is_number(best))):
        raise CheckpointError(f"{path}: damaged training state (step, elapsed or "
                              f"best_val_loss has the wrong type)")
    moments = {name: f.config.flatten(tensors) for name, tensors in f.optimizer.items()}
    model = Model.from_file(f, path, writable=True)
    if not all(np.isfinite(a).all() for a in (model.flat, *moments.values())):
        raise CheckpointError(f"{path}: the weights or the optimizer state hold values that "
                              f"are not finite (NaN or infinity)")
    return Checkpoint(path, model, moments,
                      TrainingState(step, rng, best, float(elapsed), corpus), settings)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_corpus_record(corpus) -> None:
    if not (isinstance(corpus, dict) and isinstance(corpus.get("dataset_sha256"), str)
            and isinstance(corpus.get("files"), list)
            and all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                    and isinstance(f[1], int) for f in corpus["files"])):
        raise ValueError("the corpus record is not a file list and a dataset digest")
