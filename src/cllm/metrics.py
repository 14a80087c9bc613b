"""metrics.jsonl: one JSON object per line, each with the `step` it belongs to.

    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"}   a training step
    {"step", "val_loss"}                                               an evaluation
    {"step", "final_val_loss", "val_tokens"}                           the whole-split evaluation

With the crystalline loss, each of them also holds the plain cross-entropy (`ce`, `val_ce`,
`final_val_ce`), the number that compares across settings.

`tokens_per_s` and `elapsed` (seconds of training since the run began) are timings; every
other field is a deterministic function of the run's arguments.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .fileio import atomic_write_text


class MetricsLog:
    """Appends lines, each flushed so that a killed run keeps every finished step."""

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, **fields) -> None:
        self._file.write(json.dumps(fields) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The complete lines of a metrics file (a run killed mid-write leaves a partial last
    line, which is dropped, and a damaged line is dropped too); none if the file does not
    exist."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, an integer of 5000 digits, deep
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only what a run resumed at `step` has already done: the lines of steps up to it,
    without a final evaluation (the resumed run writes its own)."""
    kept = [record for record in read_metrics(path)
            if record["step"] <= step and "final_val_loss" not in record]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
