"""Training step of the seed configuration: cllm against PyTorch eager (Hugging Face GPT-2),
and against another checkout of cllm.

    python bench/train_step.py [--threads 2] [--steps 5] [--no-torch] [--baseline DIR]
                               [--rounds 1]

Each side runs in its own process (its own peak RSS) with the same weights and batch; the step
is forward + backward, and then the whole training step (cllm.optim.train_step: clipping, the
scheduled rate and AdamW). PyTorch is optional (`pip install torch==2.13.0 transformers`);
without it only cllm is timed. --baseline DIR times the cllm of another checkout (built in
place: `python setup.py build_ext --inplace` there) through that checkout's own copy of this
script, the two taking turns for --rounds rounds, so that a change is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SEED_CONFIG, machine_line, matmul_peak_gflops, median_seconds,  # noqa: E402
                    peak_rss_mb, run_worker, train_flops_per_token)

B, T = 32, 128


def batch():
    rng = np.random.default_rng(0)
    V = SEED_CONFIG["vocab_size"]
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def cllm_worker(threads: int, steps: int, spheres: int) -> dict:
    from cllm import Model, ModelConfig
    from cllm.optim import AdamW, Schedule, train_step
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    idx, targets = batch()
    optimizer = AdamW(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = Schedule(lr=1e-4, min_lr=1e-5, warmup=0, total_steps=10 * steps)

    def fwd_bwd():
        model.loss_and_grads(idx, targets, spheres=spheres, threads=threads)

    def step():
        train_step(model, optimizer, schedule, idx, targets, 1.0, spheres, threads)

    return dict(fwd_bwd=median_seconds(fwd_bwd, steps), train=median_seconds(step, steps),
                rss_mb=peak_rss_mb())


def torch_worker(threads: int, steps: int) -> dict:
    import torch
    from cllm import Model, ModelConfig
    from hf_gpt2 import hf_model, time_train_step
    config = ModelConfig(**SEED_CONFIG)
    model = hf_model(config, Model.create(config, seed=0).params)
    idx, targets = batch()
    return dict(fwd_bwd=time_train_step(model, idx, targets, threads, steps, optimizer=False),
                train=time_train_step(model, idx, targets, threads, steps, optimizer=True),
                rss_mb=peak_rss_mb(), version=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--spheres", type=int, default=12)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another cllm checkout, built in place, to time side by side")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds of cllm and --baseline taking turns (medians are reported)")
    ap.add_argument("--worker", choices=["cllm", "torch"])
    args = ap.parse_args()
    if args.worker == "cllm":
        print(json.dumps(cllm_worker(args.threads, args.steps, args.spheres)))
        return
    if args.worker == "torch":
        print(json.dumps(torch_worker(args.threads, args.steps)))
        return

    from cllm import ModelConfig
    config = ModelConfig(**SEED_CONFIG)
    flops = train_flops_per_token(config, T) * B * T
    peak = matmul_peak_gflops(args.threads)
    common = ["--threads", str(args.threads), "--steps", str(args.steps)]
    cllm_args = ["cllm", *common, "--spheres", str(args.spheres)]
    sides = {"cllm": lambda: run_worker(__file__, *cllm_args, threads=args.threads)}
    if args.baseline is not None:
        sides["baseline"] = lambda: run_worker(args.baseline / "bench" / "train_step.py",
                                               *cllm_args, threads=args.threads,
                                               source=args.baseline / "src")
    rounds = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            rounds[name].append(run())
    # per side: the median over rounds of each figure
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in rounds.items()}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            results["pytorch"] = run_worker(__file__, "torch", *common, threads=args.threads)
        except ImportError:
            print("PyTorch or transformers is not installed: timing cllm alone")
    print(f"seed configuration, B={B} T={T}, {args.threads} threads, "
          f"{config.num_parameters() / 1e6:.1f}M parameters; {machine_line()}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"float32 matmul peak (NumPy, 2048^3): {peak:.0f} GFLOP/s")
    for name, r in results.items():
        for kind in ("fwd_bwd", "train"):
            sec = r[kind]
            print(f"{name:8s} {kind:8s} {sec:6.2f} s/step {B * T / sec:7.0f} tokens/s "
                  f"{flops / sec / 1e9:6.1f} GFLOP/s = {flops / sec / 1e9 / peak:4.0%} of peak")
        print(f"{name:8s} peak RSS {r['rss_mb']:.0f} MB")
    for other in ("baseline", "pytorch"):
        if other in results:
            for kind in ("fwd_bwd", "train"):
                print(f"cllm / {other} {results[other].get('version', '')} {kind}: "
                      f"{results[other][kind] / results['cllm'][kind]:.3f}x")
            print(f"cllm / {other} peak RSS: "
                  f"{results['cllm']['rss_mb'] / results[other]['rss_mb']:.2f}x")

if __name__ == "__main__":
    main()
