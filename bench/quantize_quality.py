"""What bf16 and int8 weights cost in quality: a model trained by `cllm train` (byte-level BPE on
Tiny Shakespeare), its validation cross-entropy at float32, bf16 and int8, and how many of 200
greedy tokens the quantized models share with float32.

    python bench/quantize_quality.py [--steps 300] [--threads 2] [--run DIR]

--run DIR keeps the run there, and reuses it (its final_model.cllm and dataset.bin) when it
has finished before.
Reads ../shared/data/tinyshakespeare.txt; writes bench/out/quantize_quality.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_line, thread_env  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VAL_FRACTION = 0.1
SEQ_LEN = 256


def train(run: Path, steps: int, threads: int) -> float:
    """Train the model with the real trainer; returns the seconds it took."""
    data = run / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "tinyshakespeare.txt").write_bytes(CORPUS.read_bytes())
    command = [sys.executable, "-m", "cllm", "train", "-d", str(data), "-c", str(run / "out"),
               "--tokenizer", "bpe", "-v", "4000", "-e", "256", "-l", "4", "-H", "8",
               "-s", str(SEQ_LEN), "-b", "16", "--max-steps", str(steps), "-r", "1e-3",
               "--min-lr", "1e-4", "--warmup", "30", "--val-fraction", str(VAL_FRACTION),
               "--eval-every", str(steps), "--eval-batches", "4",
               "--checkpoint-every", str(steps), "-t", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=thread_env(threads), stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def validation_windows(run: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's validation split cut into windows of SEQ_LEN tokens: (idx, targets)."""
    from cllm.data import open_dataset, split_train_val
    _, val = split_train_val(open_dataset(run / "out" / "dataset.bin", vocab_size),
                             VAL_FRACTION)
    n = (len(val) - 1) // SEQ_LEN
    idx = np.asarray(val[:n * SEQ_LEN], np.int64).reshape(n, SEQ_LEN)
    targets = np.asarray(val[1:n * SEQ_LEN + 1], np.int64).reshape(n, SEQ_LEN)
    return idx, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--run", type=Path, help="the run's folder, reused when it has finished")
    args = ap.parse_args()
    from cllm import Model

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or Path(tmp)
        trained = ""
        if not (run / "out" / "final_model.cllm").exists():
            seconds = train(run, args.steps, args.threads)
            trained = f", trained for {args.steps} steps in {seconds / 60:.1f} min"
        model = Model.load(run / "out" / "final_model.cllm")
        idx, targets = validation_windows(run, model.config.vocab_size)
        prompt = [int(t) for t in idx[0, :32]]
        rows = []
        greedy = None
        for weights in ("float32", "bf16", "int8"):
            m = model if weights == "float32" else model.quantized(weights)
            ce = m.cross_entropy(idx, targets, threads=args.threads)
            ids = m.generate_ids(prompt, 200, temperature=0, threads=args.threads)
            greedy = greedy or ids
            same = next((i for i, (a, b) in enumerate(zip(ids, greedy)) if a != b), len(ids))
            rows.append((weights, ce, same))
    base = rows[0][1]
    lines = ["# Quantized weights: validation cross-entropy", "",
             f"{machine_line()}", "",
             f"Model: {model.config.describe()}{trained}; {idx.size:,} validation tokens "
             f"(the last {VAL_FRACTION:.0%} of Tiny Shakespeare, windows of {SEQ_LEN}).", "",
             "| weights | validation CE (nats) | vs float32 | greedy tokens equal to float32's "
             "(of 200, before the first difference) |", "| --- | --- | --- | --- |"]
    for weights, ce, same in rows:
        lines.append(f"| {weights} | {ce:.4f} | {100 * (ce - base) / base:+.2f}% | {same} |")
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(__file__).parent / "out" / "quantize_quality.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)


if __name__ == "__main__":
    main()
