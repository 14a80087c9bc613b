"""nanoGPT's shakespeare-char CPU recipe: `cllm train` against nanoGPT itself, in one run.

    python bench/shakespeare.py [--nanogpt DIR] [--threads 2] [--steps 2000]

Reads ../shared/data/tinyshakespeare.txt (beside the repository). --nanogpt names a checkout
of karpathy/nanoGPT (it is not part of this project; PyTorch must be importable): the
benchmark writes the character dataset its prepare.py would (without downloading) into
DIR/data/shakespeare_char and runs its train.py with the README's CPU recipe. Without it,
only cllm runs. Each side is timed as a whole process (start-up, evaluations and saving
included); the machine should be otherwise idle, so the load average is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_line, run_measured  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def cllm_command(data: Path, out: Path, steps: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "cllm", "train", "-d", str(data), "-c", str(out),
            "--tokenizer", "char", "-l", "4", "-H", "4", "-e", "128", "-s", "64", "-b", "12",
            "--max-steps", str(steps), "-r", "1e-3", "--warmup", "100", "--min-lr", "1e-4",
            "--weight-decay", "0.1", "--beta2", "0.99", "--grad-clip", "1.0",
            "--val-fraction", "0.1", "--eval-every", str(min(250, steps)), "-t", str(threads),
            "--seed", "1337"]


def nanogpt_command(out: Path, steps: int) -> list[str]:
    # the README's CPU recipe ("I only have a macbook")
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
            "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
            f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
            f"--eval_interval={min(250, steps)}",
            f"--out_dir={out}"]


def run_cllm(work: Path, steps: int, threads: int) -> dict:
    data = work / "cllm_data"
    data.mkdir()
    (data / CORPUS.name).symlink_to(CORPUS)
    out = work / "cllm_out"
    wall, _, rss = run_measured(cllm_command(data, out, steps, threads), threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    last_eval = [r for r in records if "val_loss" in r][-1]
    return dict(wall_s=wall, val_loss=last_eval["val_loss"], val_step=last_eval["step"],
                final_val_loss=stats["final_val_loss"],
                ms_per_step=1000 * stats["train_time_s"] / stats["steps"], rss_mb=rss)


def prepare_nanogpt_data(nanogpt: Path) -> None:
    """What nanoGPT's data/shakespeare_char/prepare.py writes, from the local copy."""
    text = CORPUS.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    folder = nanogpt / "data" / "shakespeare_char"
    n = int(len(ids) * 0.9)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_nanogpt(nanogpt: Path, work: Path, steps: int, threads: int) -> dict:
    prepare_nanogpt_data(nanogpt)
    wall, stdout, rss = run_measured(nanogpt_command(work / "nanogpt_out", steps), threads,
                                     cwd=nanogpt)
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", stdout)
    times = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout)]
    step, val_loss = evals[-1]
    return dict(wall_s=wall, val_loss=float(val_loss), val_step=int(step),
                ms_per_step=float(np.median(times)), rss_mb=rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    print(machine_line())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"cllm": run_cllm(work, args.steps, args.threads)}
        print(f"load average after cllm: {os.getloadavg()[0]:.2f}")
        if args.nanogpt is not None:
            results["nanoGPT"] = run_nanogpt(args.nanogpt.resolve(), work, args.steps,
                                             args.threads)
            print(f"load average after nanoGPT: {os.getloadavg()[0]:.2f}")
    for name, r in results.items():
        final = f", whole-split {r['final_val_loss']:.4f}" if "final_val_loss" in r else ""
        print(f"{name:8s} val loss {r['val_loss']:.4f} at step {r['val_step']} (20 batches)"
              f"{final}; wall {r['wall_s']:.1f} s, {r['ms_per_step']:.1f} ms/step, "
              f"peak RSS {r['rss_mb']:.0f} MB")
    if "nanoGPT" in results:
        print(f"wall time cllm / nanoGPT: "
              f"{results['cllm']['wall_s'] / results['nanoGPT']['wall_s']:.2f}")
    else:
        print("nanoGPT not run (give --nanogpt DIR with a checkout of karpathy/nanoGPT)")


if __name__ == "__main__":
    main()
