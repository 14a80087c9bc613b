"""Ablation of the crystalline switches (CRYSTALLINE.md section 6) on Tiny Shakespeare.

    PYTHONPATH=src python bench/ablation.py [--steps 1000] [--seeds 3] [--threads 2]
    PYTHONPATH=src python bench/ablation.py --timing-only

Trains the same budget with no switch, each switch alone, all four together and the defaults
(angular and Ulam, the two that won), once per seed:
character tokens (ids of sorted(set(text))), 90/10 split, C=128, L=4, H=4, T=64, B=12, AdamW
(betas 0.9, 0.99, weight decay 0.1), learning rate warmed up linearly over the first 5% of the
steps then cosine from 1e-3 down to 1e-4, gradients clipped at norm 1.0. The batches are
random windows drawn from a generator seeded by the run's seed, so every setting of one seed
sees the same batches and the same starting weights where its parameters allow. Reports the
final validation cross-entropy (plain, whatever the training loss) over fixed validation
windows, its mean and spread over the seeds, its paired difference from no switch, and
training tokens/s. Writes bench/out/ablation.md and bench/out/ablation.png.

Then measures the training speed of each setting apart from the runs, which share the machine
with whatever else runs on it: the median step time of each setting, the settings taking turns
so that they share any contention alike. And it times attention alone, forward and backward,
Ulam (radius 2) against dense at T = 1024 and 4096: the attention layer kernels on one
sequence (C=128, H=4), and a one-layer model's training step, both single-threaded. Both go to
bench/out/timing.md.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_seconds  # noqa: E402

from cllm import Model, ModelConfig, _core, crystal  # noqa: E402
from cllm.config import GPT2_SWITCHES  # noqa: E402
from cllm.threads import blas_single_threaded  # noqa: E402
from cllm.optim import AdamW, clip_scale, grad_norm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OUT = ROOT / "bench" / "out"

MODEL = dict(n_ctx=64, n_embd=128, n_layer=4, n_head=4)
B, T = 12, 64
LR, MIN_LR, WARMUP_FRACTION = 1e-3, 1e-4, 0.05
EVAL_BATCHES, CURVE_POINTS, CURVE_BATCHES = 100, 5, 10

SETTINGS = {
    "none": GPT2_SWITCHES,
    "lattice": {**GPT2_SWITCHES, "init": "lattice"},
    "angular": {**GPT2_SWITCHES, "position": "angular"},
    "ulam": {**GPT2_SWITCHES, "attention": "ulam"},
    "crystalline": {**GPT2_SWITCHES, "loss": "crystalline"},
    "all four": dict(init="lattice", position="angular", attention="ulam", loss="crystalline"),
    "defaults": dict(init="normal", position="angular", attention="ulam", loss="ce"),
}


def load_tokens(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, validation ids, vocabulary size): characters, the first 90% for training."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    table = {c: i for i, c in enumerate(chars)}
    ids = np.array([table[c] for c in text], dtype=np.int64)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(chars)


def windows(ids: np.ndarray, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` random windows of T tokens and their next-token targets."""
    starts = rng.integers(0, len(ids) - T - 1, batch)
    x = np.stack([ids[s:s + T] for s in starts])
    y = np.stack([ids[s + 1:s + T + 1] for s in starts])
    return x, y


def learning_rate(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def validation_ce(model: Model, batches, threads: int) -> float:
    return statistics.fmean(model.cross_entropy(x, y, threads=threads) for x, y in batches)


def train(setting: dict, seed: int, vocab_size: int, train_ids, val_batches, steps: int,
          threads: int) -> dict:
    model = Model.create(ModelConfig(vocab_size=vocab_size, **MODEL, **setting), seed=seed)
    opt = AdamW(model, lr=LR, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    curve_every = max(1, steps // CURVE_POINTS)
    curve, train_seconds = [], 0.0
    for step in range(steps):
        x, y = windows(train_ids, rng, B)
        start = time.perf_counter()
        model.loss_and_grads(x, y, threads=threads)
        scale = clip_scale(grad_norm(model.grad_flat, threads), 1.0)
        opt.step(model.grad_flat, lr=learning_rate(step, steps), grad_scale=scale,
                 threads=threads)
        train_seconds += time.perf_counter() - start
        if (step + 1) % curve_every == 0 and step + 1 < steps:
            curve.append((step + 1, validation_ce(model, val_batches[:CURVE_BATCHES], threads)))
    final = validation_ce(model, val_batches, threads)
    curve.append((steps, final))
    return dict(val_ce=final, train_ce=model.last_ce, curve=curve,
                tokens_per_s=steps * B * T / train_seconds)


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    none = [r["val_ce"] for r in results["none"]]
    for name, runs in results.items():
        ce = [r["val_ce"] for r in runs]
        diff = [a - b for a, b in zip(ce, none)]
        rows.append(dict(
            name=name, mean=statistics.fmean(ce),
            std=statistics.stdev(ce) if len(ce) > 1 else 0.0,
            diff=statistics.fmean(diff),
            diff_std=statistics.stdev(diff) if len(diff) > 1 else 0.0,
            seeds=ce, tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in runs)))
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| setting | validation CE, mean ± std | minus none (paired), mean ± std | "
             "per seed | tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     f"{r['diff']:+.4f} ± {r['diff_std']:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in r['seeds'])} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
        curves.plot(steps, mean, marker="o", label=name)
    curves.set_xlabel("step")
    curves.set_ylabel("validation cross-entropy (mean over seeds)")
    curves.legend()
    curves.grid(alpha=0.3)
    names = [r["name"] for r in rows]
    bars.bar(names, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4,
             color="tab:blue")
    low = min(r["mean"] - r["std"] for r in rows)
    high = max(r["mean"] + r["std"] for r in rows)
    bars.set_ylim(low - 0.5 * (high - low) - 0.01, high + 0.2 * (high - low) + 0.01)
    bars.set_ylabel("final validation cross-entropy")
    bars.tick_params(axis="x", rotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ablation(steps: int, seeds: int, threads: int, data: Path, settings: list[str]) -> None:
    train_ids, val_ids, vocab_size = load_tokens(data)
    val_rng = np.random.default_rng(1_000_003)
    val_batches = [windows(val_ids, val_rng, B) for _ in range(EVAL_BATCHES)]
    load = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in settings}
    start = time.time()
    for seed in range(seeds):
        for name in settings:
            r = train(SETTINGS[name], seed, vocab_size, train_ids, val_batches, steps, threads)
            results[name].append(r)
            print(f"seed {seed} {name:12s} val CE {r['val_ce']:.4f} "
                  f"({r['tokens_per_s']:.0f} tokens/s, {time.time() - start:.0f} s so far)",
                  flush=True)
    rows = summarise(results)
    header = (f"{steps} steps of B={B} x T={T} characters, C={MODEL['n_embd']} "
              f"L={MODEL['n_layer']} H={MODEL['n_head']}, {seeds} seeds, {threads} threads; "
              f"{machine_line()}; load average before {load[0]:.2f}, after "
              f"{os.getloadavg()[0]:.2f}; {time.time() - start:.0f} s in all")
    OUT.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, header)
    (OUT / "ablation.md").write_text(table)
    plot(results, rows, OUT / "ablation.png", header)
    print(table)


def throughput(vocab_size: int, threads: int, rounds=5, steps=20) -> str:
    """Training tokens/s of each setting from its median step time; the settings take turns,
    `steps` steps each per round."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, 100_000)
    runs = {}
    for name, setting in SETTINGS.items():
        model = Model.create(ModelConfig(vocab_size=vocab_size, **MODEL, **setting))
        runs[name] = (model, AdamW(model, lr=LR, betas=(0.9, 0.99), weight_decay=0.1), [])
    for _ in range(rounds):
        for name, (model, opt, seconds) in runs.items():
            for _ in range(steps):
                x, y = windows(ids, rng, B)
                start = time.perf_counter()
                model.loss_and_grads(x, y, threads=threads)
                scale = clip_scale(grad_norm(model.grad_flat, threads), 1.0)
                opt.step(model.grad_flat, grad_scale=scale, threads=threads)
                seconds.append(time.perf_counter() - start)
    lines = [f"Training speed, median of {(rounds - 1) * steps} steps per setting taken in turns "
             f"after a round of warm-up, "
             f"{threads} threads; {machine_line()}; load average {os.getloadavg()[0]:.2f}", "",
             "| setting | ms/step | tokens/s |", "| --- | --- | --- |"]
    for name, (_, _, seconds) in runs.items():
        median = statistics.median(seconds[steps:])   # the first round warms up
        lines.append(f"| {name} | {1e3 * median:.1f} | {B * T / median:.0f} |")
    return "\n".join(lines) + "\n"


def attention_timing(vocab_size: int, lengths=(1024, 4096), C=128, H=4, radius=2,
                     repeats=3) -> str:
    rng = np.random.default_rng(0)
    lines = [f"Attention alone, forward + backward, one sequence, C={C} H={H}, Ulam radius "
             f"{radius}, one thread; {machine_line()}; load average {os.getloadavg()[0]:.2f}",
             "", "| T | dense kernels | Ulam kernels | dense 1-layer model step | "
             "Ulam 1-layer model step |", "| --- | --- | --- | --- | --- |"]
    for T_ in lengths:
        qkv = rng.standard_normal((1, T_, 3 * C), dtype=np.float32)
        dy = rng.standard_normal((1, T_, C), dtype=np.float32)
        start, keys = crystal.ulam_neighbours(T_, radius)

        def dense():
            _, att = _core.layer_attention(qkv, H)
            _core.layer_attention_backward(dy, att, qkv)

        def ulam():
            _, att = _core.layer_ulam_attention(qkv, H, start, keys)
            _core.layer_ulam_attention_backward(dy, att, qkv, start, keys)

        def model_step(attention):
            model = Model.create(ModelConfig(vocab_size=vocab_size, n_ctx=T_, n_embd=C,
                                             n_layer=1, n_head=H, ulam_radius=radius,
                                             **{**GPT2_SWITCHES, "attention": attention}))
            x = rng.integers(0, vocab_size, (1, T_))
            return lambda: model.loss_and_grads(x, x, spheres=1, threads=1)

        with blas_single_threaded():
            times = [median_seconds(dense, repeats), median_seconds(ulam, repeats),
                     median_seconds(model_step("dense"), repeats),
                     median_seconds(model_step("ulam"), repeats)]
        lines.append(f"| {T_} | " + " | ".join(f"{1e3 * s:.1f} ms" for s in times) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                    metavar="NAME", help="the settings to train ('none' is always included: "
                    "the differences are taken against it); default: all of them")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip the training runs: training speed and attention timing only")
    args = ap.parse_args()
    if not args.timing_only:
        settings = ["none"] + [name for name in args.settings if name != "none"]
        ablation(args.steps, args.seeds, args.threads, args.data, settings)
    OUT.mkdir(parents=True, exist_ok=True)
    vocab_size = load_tokens(args.data)[2]
    timing = throughput(vocab_size, args.threads) + "\n" + attention_timing(vocab_size)
    (OUT / "timing.md").write_text(timing)
    print(timing)


if __name__ == "__main__":
    main()
