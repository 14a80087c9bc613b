"""What a finished run leaves besides the model: samples.txt, stats.json and loss.png."""
from __future__ import annotations

import io
import json
import os
import resource

import numpy as np

from .fileio import atomic_write_bytes, atomic_write_text
from .model import Model
from .tokenizer import decode

SAMPLES = 3
SAMPLE_TOKENS = 200
SAMPLE_TEMPERATURE = 0.8
_SAMPLE_STREAM = 3  # stream of the run's seed that the sampling draws from


def generate_samples(model: Model, tokens: np.ndarray, window: int, seed: int,
                     threads: int) -> list[str]:
    """SAMPLES continuations of short prompts taken from evenly spaced points of `tokens`.

    Generation stays within the first `window` positions (the training sequence length):
    the positions past it, up to n_ctx, were never trained on. Each chunk of new tokens is
    generated from the text before it, cut to fit the window."""
    prompt_tokens = max(1, min(16, window // 4))
    texts = []
    for i in range(SAMPLES):
        start = i * (len(tokens) - prompt_tokens) // SAMPLES
        ids = [int(t) for t in tokens[start:start + prompt_tokens]]
        rng = np.random.default_rng([seed, _SAMPLE_STREAM, i])
        chunk = max(1, window // 2)
        new = []
        while len(new) < SAMPLE_TOKENS:
            n = min(chunk, SAMPLE_TOKENS - len(new))
            context = (ids + new)[-max(1, window - n):]
            new += model.generate_ids(context, max_new_tokens=n, temperature=SAMPLE_TEMPERATURE,
                                      seed=int(rng.integers(2**63)), threads=threads)
        texts.append(decode(model.tokenizer, ids + new))
    return texts


def write_samples(texts: list[str], path: str | os.PathLike) -> None:
    atomic_write_text(path, "".join(f"----- sample {i + 1} -----\n{text}\n"
                                    for i, text in enumerate(texts)))


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_stats(stats: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(stats, indent=2) + "\n")


def plot_losses(records: list[dict], path: str | os.PathLike) -> None:
    """Training and validation loss against steps, from the metrics.jsonl records."""
    # Agg through the object API: no pyplot, so no global backend state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    series = [("loss", "train", dict(linewidth=0.8, alpha=0.7)),
              ("val_loss", "validation", dict(marker="o")),
              ("final_val_loss", "final validation (whole split)", dict(marker="*", markersize=12,
                                                                        linestyle="none"))]
    for key, label, style in series:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    atomic_write_bytes(path, buffer.getvalue())
