"""Fine-tuning GPT-2 small (124M: V=50257, n_ctx=1024, C=768, L=12, H=12) on one batch shape:
cllm's training step against PyTorch eager (Hugging Face GPT2LMHeadModel), same weights and
batch, each side in its own process on the same cores.

    python bench/finetune.py [--threads 2] [--steps 3] [--batch 8] [--seq 256] [--no-torch]

A step is forward, backward, clipping to norm 1.0 and AdamW (lr 1e-4, betas 0.9/0.95, weight
decay 0.1): cllm.optim.train_step with 12 spheres, torch.optim.AdamW with
clip_grad_norm_. The weights are random (nothing is downloaded): the arithmetic of a step does
not depend on them. Reported: the median over --steps steps after one untimed step, tokens per
second, and each process's peak RSS (model, gradients, optimizer state and activations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_seconds, peak_rss_mb, run_worker  # noqa: E402

GPT2_SMALL = dict(vocab_size=50257, n_ctx=1024, n_embd=768, n_layer=12, n_head=12,
                  tie_embeddings=True)


def gpt2_small():
    from cllm import ModelConfig
    from cllm.config import GPT2_SWITCHES
    return ModelConfig(**GPT2_SMALL, **GPT2_SWITCHES)


def batch(B: int, T: int):
    rng = np.random.default_rng(0)
    V = GPT2_SMALL["vocab_size"]
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def cllm_worker(threads: int, steps: int, B: int, T: int) -> dict:
    from cllm import Model
    from cllm.optim import AdamW, Schedule, train_step
    model = Model.create(gpt2_small(), seed=0)
    idx, targets = batch(B, T)
    optimizer = AdamW(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = Schedule(lr=1e-4, min_lr=1e-5, warmup=0, total_steps=10 * steps)

    def step():
        train_step(model, optimizer, schedule, idx, targets, 1.0, 12, threads)

    return dict(seconds=median_seconds(step, steps), rss_mb=peak_rss_mb())


def torch_worker(threads: int, steps: int, B: int, T: int) -> dict:
    import torch
    from cllm import Model
    from hf_gpt2 import hf_model, time_train_step
    config = gpt2_small()
    model = hf_model(config, Model.create(config, seed=0).params)
    idx, targets = batch(B, T)
    seconds = time_train_step(model, idx, targets, threads, steps, optimizer=True)
    return dict(seconds=seconds, rss_mb=peak_rss_mb(), version=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", choices=["cllm", "torch"])
    args = ap.parse_args()
    shape = (args.threads, args.steps, args.batch, args.seq)
    if args.worker:
        worker = cllm_worker if args.worker == "cllm" else torch_worker
        print(json.dumps(worker(*shape)))
        return
    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--batch",
              str(args.batch), "--seq", str(args.seq)]
    load_before = os.getloadavg()[0]
    results = {"cllm": run_worker(__file__, "cllm", *common, threads=args.threads)}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            results["pytorch"] = run_worker(__file__, "torch", *common, threads=args.threads)
        except ImportError:
            print("PyTorch or transformers is not installed: timing cllm alone")
    tokens = args.batch * args.seq
    print(f"GPT-2 small fine-tuning step, B={args.batch} T={args.seq}, {args.threads} threads, "
          f"{gpt2_small().num_parameters() / 1e6:.1f}M parameters, median of {args.steps} "
          f"steps; {machine_line()}; load average before {load_before:.2f}, after "
          f"{os.getloadavg()[0]:.2f}")
    for name, r in results.items():
        print(f"{name:8s} {r['seconds']:6.2f} s/step {tokens / r['seconds']:7.0f} tokens/s "
              f"peak RSS {r['rss_mb']:,.0f} MB {r.get('version', '')}")
    if "pytorch" in results:
        print(f"cllm / pytorch speed: {results['pytorch']['seconds'] / results['cllm']['seconds']:.2f}x, "
              f"peak RSS: {results['cllm']['rss_mb'] / results['pytorch']['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
