"""`cllm train`: a folder of text to a trained model in six phases, every file it writes
crash-safe, and exactly resumable from any checkpoint.

Everything goes into the checkpoint folder (-c): tokenizer.json, vocab.txt, dataset.bin,
metrics.jsonl, checkpoint_step_N.cllm, final_model.cllm, samples.txt, stats.json, loss.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import signal
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .architecture import DERIVED_IN_TRAINING, check_architecture, chosen_architecture
from .checkpoint import list_checkpoints, load_float32_cllm
from .config import ModelConfig
from .data import (build_dataset, corpus_change, corpus_record, find_text_files, iter_texts,
                   iter_windows_sequential, open_dataset, sample_windows, split_train_val)
from .errors import CllmError, DataError, Stopped, UnverifiedFile
from .fileio import remove_stale_temporaries
from .metrics import MetricsLog, read_metrics, truncate_metrics
from .model import Model
from .optim import AdamW, Schedule, train_step
from .report import generate_samples, peak_memory_mb, plot_losses, write_samples, write_stats
from .resume import Checkpoint, TrainingState, newest_checkpoint, save_checkpoint
from .runlock import run_lock
from . import parallel
from .settings import TrainConfig, check_agrees
from .threads import usable_cores
from .tokenizer import save_tokenizer, tokenizer_kind, train_bpe, train_char

PHASES = ("Data loading", "Vocabulary building", "Dataset creation", "Model initialization",
          "Training", "Final save")
# Streams of the run's seed, apart from the model's initialisation: the windows each step
# trains on, and the fixed validation windows of the periodic evaluations.
_TRAIN_WINDOWS, _EVAL_WINDOWS = 1, 2
FINAL_MODEL = "final_model.cllm"


def train(args: argparse.Namespace, explicit: set[str], argv: list[str]) -> None:
    """Run the six phases. `explicit` names the flags the user gave (their field names): only
    those may contradict a checkpoint or model file, and only to raise an error. `argv` is the
    command line, which --processes N runs again as an MPI job of N processes."""
    started = time.perf_counter()
    run = TrainConfig.from_args(args)
    if run.processes > 1 and parallel.world_size() == 1:
        _launched(run, argv)
        return
    group = parallel.ProcessGroup() if parallel.world_size() > 1 else None
    if group is not None and group.rank > 0:
        _follow(group, run)
        return
    architecture = chosen_architecture(args, DERIVED_IN_TRAINING)
    out = _output_folder(Path(run.checkpoint))
    with run_lock(out):
        # a killed run's partial files: a checkpoint's can be as large as the model three times
        remove_stale_temporaries(out)
        _phases(run, architecture, explicit, out, started, group)


def _launched(run: TrainConfig, argv: list[str]) -> None:
    code = parallel.launch(run.processes, parallel.without_processes_flag(argv), run.threads)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP):
        raise Stopped(code - 128)
    if code != 0:
        raise CllmError(f"the training job of {run.processes} processes ended with exit status "
                        f"{code} (the lines above say which process failed and why); the "
                        f"checkpoints in {run.checkpoint} are intact: continue with --resume")


def _follow(group: parallel.ProcessGroup, run: TrainConfig) -> None:
    """A rank other than Node Zero: it trains its block of spheres on Node Zero's batches and
    keeps the same weights, step by step, until Node Zero says stop. Stop signals are Node
    Zero's to act on (mpiexec delivers them to every rank)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    config, settings, step, total_steps = group.share()
    settings = TrainConfig(**settings)
    model = Model(ModelConfig.from_dict(config))
    optimizer = _optimizer(model, settings)
    for array in (model.flat, optimizer.m, optimizer.v):
        group.share_array(array)
    optimizer.step_count = step
    schedule = Schedule(settings.lr, settings.min_lr, settings.warmup, total_steps)
    threads = run.threads or usable_cores()
    while (command := group.share())[0] == parallel.STEP:
        _, x, y = command
        train_step(model, optimizer, schedule, x, y, settings.grad_clip, settings.spheres,
                   threads, group)


def _phases(run: TrainConfig, architecture: dict, explicit: set[str], out: Path,
            started: float, group: parallel.ProcessGroup | None) -> None:
    resumed = initial = None
    if run.resume:
        resumed = newest_checkpoint(out)
        check_agrees(ModelConfig, architecture, explicit,
                     chosen_architecture(resumed.model.config, DERIVED_IN_TRAINING), "the checkpoint")
        run = run.resumed(resumed.settings, explicit)
        print(f"resuming from {resumed.path} at step {resumed.state.step}", flush=True)
    else:
        _refuse_earlier_run(out)
        check_architecture(architecture)
        if run.init_from:
            initial = Model.from_file(load_float32_cllm(run.init_from, "train from"),
                                      run.init_from, writable=True)
            run = _take_architecture(run, architecture, explicit, initial)
    run = _resolve(run)

    _announce(1)
    files = find_text_files(run.data)
    skipped = f" ({files.skipped} skipped: not UTF-8 text)" if files.skipped else ""
    print(f"  {len(files.paths)} text files, {files.total_bytes / 1e6:.1f} MB{skipped}",
          flush=True)

    _announce(2)
    if resumed is not None:
        tokenizer, source = resumed.model.tokenizer, "from the checkpoint"
    elif initial is not None and initial.tokenizer is not None:
        tokenizer, source = initial.tokenizer, f"from {run.init_from}"
    else:
        tokenizer, source = _train_tokenizer(files, run), f"{run.tokenizer}, from the corpus"
    save_tokenizer(tokenizer, out)
    vocab_size = tokenizer.get_vocab_size()
    print(f"  {vocab_size} tokens ({source}): tokenizer.json, vocab.txt", flush=True)

    _announce(3)
    with _bar(files.total_bytes, "encoding", unit="B", unit_scale=True) as bar:
        build_dataset(tokenizer, files, out / "dataset.bin", bar.update)
    corpus = corpus_record(files, out / "dataset.bin")
    if resumed is not None:
        _check_same_data(run, resumed, corpus)
    tokens = open_dataset(out / "dataset.bin", vocab_size)
    train_split, val_split = split_train_val(tokens, run.val_fraction)
    _require_sequences(run, train_split, val_split)
    print(f"  {len(tokens):,} tokens ({tokens.dtype.itemsize * 8}-bit ids): "
          f"{len(train_split):,} training, {len(val_split):,} validation", flush=True)

    _announce(4)
    model, optimizer, state = _initial_model(run, architecture, tokenizer, resumed, initial)
    state.corpus = corpus
    print(f"  GPT-2: {model.config.describe()}", flush=True)

    _announce(5)
    total_steps = run.max_steps or max(
        1, run.epochs * (len(train_split) // (run.batch * run.seq_len)))
    if group is not None:
        group.share((model.config.to_dict(), dataclasses.asdict(run), optimizer.step_count,
                     total_steps))
        for array in (model.flat, optimizer.m, optimizer.v):
            group.share_array(array)
        print(f"  {group.size} processes, spheres in blocks of "
              f"{', '.join(str(b - a) for a, b in parallel.sphere_blocks(run.spheres, group.size))}",
              flush=True)
    with _metrics_log(out / "metrics.jsonl", state.step) as metrics:
        _train_loop(run, model, optimizer, state, total_steps, train_split, val_split, out,
                    metrics, group)
        _announce(6)
        _final_save(run, model, state, val_split, train_split, out, metrics, started)


def _announce(phase: int) -> None:
    print(f"[{phase}/{len(PHASES)}] {PHASES[phase - 1]}", flush=True)


def _bar(total: int, desc: str, **kwargs) -> tqdm:
    return tqdm(total=total, desc=f"  {desc}", dynamic_ncols=True, **kwargs)


# ---- before the phases: the output folder and the arguments ----

def _output_folder(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise CllmError(f"{folder}: the checkpoint folder is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CllmError(f"{folder}: cannot create the checkpoint folder: {e.strerror}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CllmError(f"{folder}: the checkpoint folder is not writable")
    return folder


def _refuse_earlier_run(out: Path) -> None:
    """A new run would overwrite an earlier one's files; resuming it is what was likely meant."""
    earlier = [path for _, path in list_checkpoints(out)] + [
        path for path in [out / FINAL_MODEL] if path.exists()]
    if earlier:
        raise CllmError(f"{out} holds an earlier run ({earlier[0].name}): continue it with "
                        f"--resume, or give another folder with -c")


def _take_architecture(run: TrainConfig, architecture: dict, explicit: set[str],
                       model: Model) -> TrainConfig:
    """--init-from: the architecture (and tokenizer, if it has one) comes from the file."""
    check_agrees(ModelConfig, architecture, explicit,
                 chosen_architecture(model.config, DERIVED_IN_TRAINING), run.init_from)
    if model.tokenizer is not None and tokenizer_kind(model.tokenizer) is not None:
        kind = tokenizer_kind(model.tokenizer)
        check_agrees(TrainConfig, vars(run), explicit, {"tokenizer": kind}, run.init_from)
        run = dataclasses.replace(run, tokenizer=kind)
    n_ctx = model.config.n_ctx
    if "seq_len" not in explicit:
        # the relation n_ctx = 2 x seq-len of new models
        return dataclasses.replace(run, seq_len=max(1, n_ctx // 2))
    if run.seq_len > n_ctx:
        raise CllmError(f"--seq-len {run.seq_len} exceeds the context of {run.init_from} "
                        f"({n_ctx} tokens)")
    return run


def _check_same_data(run: TrainConfig, resumed: Checkpoint, corpus: dict) -> None:
    """A resumed run continues exactly only on the data it was trained on."""
    if resumed.state.corpus is None:
        warnings.warn(f"{resumed.path} does not record the corpus it was trained on (written "
                      f"by cllm 0.1): the data cannot be checked", UnverifiedFile)
        return
    change = corpus_change(resumed.state.corpus, corpus)
    if change is None:
        return
    if not run.accept_changed_data:
        raise DataError(f"{run.data} differs from the corpus {resumed.path.name} was trained "
                        f"on: {change}. Resuming would not continue the same run; give "
                        f"--accept-changed-data to train on the new data anyway")
    print(f"  continuing on changed data ({change})", flush=True)


def _resolve(run: TrainConfig) -> TrainConfig:
    if run.min_lr is None:
        run = dataclasses.replace(run, min_lr=run.lr / 10)
    if run.min_lr > run.lr:
        raise CllmError(f"--min-lr ({run.min_lr:g}) must not exceed --lr ({run.lr:g})")
    return run


# ---- phases 2 to 4 ----

def _train_tokenizer(files, run: TrainConfig):
    with _bar(len(files.paths), "reading", unit="file") as bar:
        texts = _counted(iter_texts(files), bar)
        return train_char(texts) if run.tokenizer == "char" else train_bpe(texts, run.vocab)


def _counted(texts, bar: tqdm):
    for text in texts:
        yield text
        bar.update()


def _require_sequences(run: TrainConfig, train_split, val_split) -> None:
    needed = run.seq_len + 1  # one window's inputs and the target after its last token
    if len(train_split) < needed:
        raise DataError(f"the corpus is too short: its training split has {len(train_split)} "
                        f"tokens and one sequence of --seq-len {run.seq_len} needs {needed}")
    if run.val_fraction > 0 and len(val_split) < needed:
        raise DataError(f"the validation split (--val-fraction {run.val_fraction:g}) has "
                        f"{len(val_split)} tokens and one sequence of --seq-len {run.seq_len} "
                        f"needs {needed}: give more text, a larger --val-fraction, or 0 for none")


def _optimizer(model: Model, run: TrainConfig) -> AdamW:
    return AdamW(model, lr=run.lr, betas=(run.beta1, run.beta2), weight_decay=run.weight_decay)


def _initial_model(run: TrainConfig, architecture: dict, tokenizer,
                   resumed: Checkpoint | None, initial: Model | None) -> tuple[Model, AdamW, TrainingState]:
    if resumed is not None:
        model = resumed.model
    elif initial is not None:
        model = initial
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise DataError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                            f"{run.init_from} has room for {model.config.vocab_size}")
        model.tokenizer = tokenizer
    else:
        config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_ctx=2 * run.seq_len,
                             **architecture)
        model = Model.create(config, seed=run.seed, tokenizer=tokenizer)
    optimizer = _optimizer(model, run)
    if resumed is None:
        return model, optimizer, TrainingState(
            0, np.random.default_rng([run.seed, _TRAIN_WINDOWS]), None, 0.0)
    optimizer.m[...] = resumed.moments["m"]
    optimizer.v[...] = resumed.moments["v"]
    optimizer.step_count = resumed.state.step
    return model, optimizer, resumed.state


# ---- phase 5 ----

@contextlib.contextmanager
def _metrics_log(path: Path, step: int):
    """metrics.jsonl holding exactly the lines of the steps done so far, open for appending."""
    truncate_metrics(path, step)
    log = MetricsLog(path)
    try:
        yield log
    finally:
        log.close()


# Ctrl-C, a scheduler's stop (Slurm and Kubernetes send SIGTERM, then wait a grace period) and
# a closed terminal: each checkpoints the finished step and ends the run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# A signal within this many seconds of the first is the same request arriving twice (a
# terminal's Ctrl-C reaches every process of an MPI job, and mpiexec forwards it again).
_SAME_REQUEST_SECONDS = 1.0


@contextlib.contextmanager
def _deferred_stop():
    """A stop signal is recorded (in the yielded list) instead of acting, so that the step in
    progress finishes and is checkpointed; another one, later than _SAME_REQUEST_SECONDS,
    acts at once (KeyboardInterrupt for SIGINT, the signal's default end for the others)."""
    received: list[int] = []
    first_at: list[float] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            first_at.append(time.monotonic())
        elif time.monotonic() - first_at[0] > _SAME_REQUEST_SECONDS:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def _train_loop(run: TrainConfig, model: Model, optimizer: AdamW, state: TrainingState,
                total_steps: int, train_split, val_split, out: Path, metrics: MetricsLog,
                group: parallel.ProcessGroup | None) -> None:
    # The other ranks end with Node Zero's training, whether it finished or was stopped by a
    # signal (still deferred meanwhile, so that a copy of the same signal cannot interrupt
    # the release); after an error, the command aborts the whole job instead.
    with _deferred_stop() as stop_signals:
        try:
            _steps(run, model, optimizer, state, total_steps, train_split, val_split, out,
                   metrics, group, stop_signals)
        except Stopped:
            if group is not None:
                parallel.release(group)
            raise
        if group is not None:
            parallel.release(group)


def _steps(run: TrainConfig, model: Model, optimizer: AdamW, state: TrainingState,
           total_steps: int, train_split, val_split, out: Path, metrics: MetricsLog,
           group: parallel.ProcessGroup | None, stop_signals: list[int]) -> None:
    B, T = run.batch, run.seq_len
    threads = run.threads or usable_cores()
    evaluating = run.eval_every > 0 and len(val_split) > 0
    if evaluating:
        eval_rng = np.random.default_rng([run.seed, _EVAL_WINDOWS])
        eval_batches = [sample_windows(eval_rng, val_split, B, T, "the validation split")
                        for _ in range(run.eval_batches)]
    print(f"  {total_steps} steps of {B} x {T} tokens, lr {run.lr:g} (warmup {run.warmup}, "
          f"cosine to {run.min_lr:g}), {threads} threads, {run.spheres} spheres", flush=True)
    if state.step >= total_steps:
        print(f"  already trained to step {state.step}", flush=True)
        return
    schedule = Schedule(run.lr, run.min_lr, run.warmup, total_steps)
    resumed_elapsed, loop_start = state.elapsed, time.perf_counter()
    smoothed_rate = None
    with _bar(total_steps, "training", initial=state.step, unit="step") as bar:
        while state.step < total_steps:
            step_start = time.perf_counter()
            # Node Zero: the batch of random windows every sphere's share is cut from
            x, y = sample_windows(state.rng, train_split, B, T, "the training split")
            if group is not None:
                group.share((parallel.STEP, x, y))
            done = train_step(model, optimizer, schedule, x, y, run.grad_clip, run.spheres,
                              threads, group)
            rate = B * T / (time.perf_counter() - step_start)
            state.step = step = optimizer.step_count
            state.elapsed = resumed_elapsed + time.perf_counter() - loop_start
            metrics.write(step=step, loss=done.loss, lr=done.lr, grad_norm=done.grad_norm,
                          tokens_per_s=rate, elapsed=state.elapsed,
                          **_plain_ce(model, "ce", done.ce))
            if evaluating and step % run.eval_every == 0:
                val_loss, val_ce = _mean_loss(model, eval_batches, run.spheres, threads)
                metrics.write(step=step, val_loss=val_loss, **_plain_ce(model, "val_ce", val_ce))
                state.best_val_loss = _lowest(state.best_val_loss, val_loss)
                bar.write(f"  step {step}: validation loss {val_loss:.4f}"
                          + "".join(f" (cross-entropy {ce:.4f})"
                                    for ce in _plain_ce(model, "val_ce", val_ce).values()))
            saved = None
            if step % run.checkpoint_every == 0:
                saved = save_checkpoint(out, model, optimizer, state, run)
            smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
            bar.set_postfix_str(f"loss {done.loss:.4f}, lr {done.lr:.2e}, "
                                f"{smoothed_rate:,.0f} tokens/s", refresh=False)
            bar.update()
            if stop_signals:
                path = saved or save_checkpoint(out, model, optimizer, state, run)
                bar.close()
                how = ("interrupted" if stop_signals[0] == signal.SIGINT
                       else f"stopped by {signal.Signals(stop_signals[0]).name}")
                print(f"{how}: step {step} saved to {path}; continue with --resume", flush=True)
                raise Stopped(stop_signals[0])


def _mean_loss(model: Model, batches, spheres: int, threads: int) -> tuple[float, float]:
    """Mean loss and mean plain cross-entropy per target token over (x, y) batches, which may
    differ in size."""
    total, total_ce, count = 0.0, 0.0, 0
    for x, y in batches:
        losses = model.loss(x, y, spheres=spheres, threads=threads)
        total += losses.loss * y.size
        total_ce += losses.ce * y.size
        count += y.size
    return total / count, total_ce / count


def _plain_ce(model: Model, key: str, ce: float) -> dict:
    """{key: ce} where the training loss is not plain cross-entropy (the crystalline loss):
    cross-entropy is the number that compares across settings."""
    return {key: ce} if model.config.loss != "ce" else {}


def _lowest(best: float | None, loss: float) -> float:
    return loss if best is None else min(best, loss)


# ---- phase 6 ----

def _shown(value) -> str:
    return str(round(value, 4) if isinstance(value, float) else value)


def _final_save(run, model: Model, state: TrainingState, val_split, train_split, out: Path,
                metrics: MetricsLog, started: float) -> None:
    threads = run.threads or usable_cores()
    model.save(out / FINAL_MODEL)
    print(f"  {out / FINAL_MODEL}", flush=True)

    final_val_loss = None
    if len(val_split):
        windows = (len(val_split) - 1) // run.seq_len
        with _bar(math.ceil(windows / run.batch), "validating", unit="batch") as bar:
            batches = _counted(iter_windows_sequential(val_split, run.batch, run.seq_len,
                                                       "the validation split"), bar)
            final_val_loss, final_val_ce = _mean_loss(model, batches, run.spheres, threads)
        metrics.write(step=state.step, final_val_loss=final_val_loss,
                      val_tokens=windows * run.seq_len,
                      **_plain_ce(model, "final_val_ce", final_val_ce))
        state.best_val_loss = _lowest(state.best_val_loss, final_val_loss)
        print(f"  final validation loss {final_val_loss:.4f} over the whole validation split "
              f"({windows * run.seq_len:,} tokens)", flush=True)

    # prompts from text the model did not train on, where there is such text
    samples = generate_samples(model, val_split if len(val_split) else train_split,
                               run.seq_len, run.seed, threads)
    write_samples(samples, out / "samples.txt")
    for i, text in enumerate(samples):
        print(f"----- sample {i + 1} -----\n{text}", flush=True)

    tokens = state.step * run.batch * run.seq_len
    stats = dict(steps=state.step, tokens=tokens, parameters=model.num_parameters,
                 wall_time_s=round(time.perf_counter() - started, 3),
                 train_time_s=round(state.elapsed, 3),
                 tokens_per_s=round(tokens / state.elapsed, 1) if state.elapsed else None,
                 best_val_loss=state.best_val_loss, final_val_loss=final_val_loss,
                 peak_memory_mb=round(peak_memory_mb(), 1))
    write_stats(stats, out / "stats.json")
    print("  " + ", ".join(f"{name.replace('_', ' ')} {_shown(value)}"
                           for name, value in stats.items()), flush=True)
    plot_losses(read_metrics(out / "metrics.jsonl"), out / "loss.png")
    print(f"  {out}: samples.txt, stats.json, loss.png, metrics.jsonl", flush=True)
    print(f"generate with it: cllm infer -m {shlex.quote(str(out / FINAL_MODEL))} "
          f"-p 'Your prompt' -n 100", flush=True)
