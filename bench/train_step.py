"""Training step of the seed configuration: cllm against PyTorch eager (Hugging Face GPT-2),
and against another checkout of cllm.

    python bench/train_step.py [--threads 2] [--steps 5] [--no-torch]
    python bench/train_step.py --baseline DIR [--pairs 20] [--threads 2]

Each side runs in its own process (its own peak RSS) with the same weights and batch; the step
is forward + backward, and then the whole training step (clipping, the scheduled rate and
AdamW). PyTorch is optional (`pip install torch==2.13.0 transformers`); without it only cllm is
timed.

--baseline DIR measures a change side by side: this tree's cllm and that of another checkout
(built in place: `python setup.py build_ext --inplace` there) each stay loaded in a process of
their own and take turns a whole training step at a time (A B, then B A, ...), so that both see
the same moments of a machine whose speed drifts by 10-20%; the speed ratio is the median over
the pairs of the two steps' times, with its quartiles.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (REPO, SEED_CONFIG, machine_line, matmul_peak_gflops,  # noqa: E402
                    median_seconds, peak_rss_mb, run_worker, thread_env, train_flops_per_token)

B, T = 32, 128


def batch():
    rng = np.random.default_rng(0)
    V = SEED_CONFIG["vocab_size"]
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def cllm_steps(threads: int, spheres: int):
    """(forward + backward, whole training step) of the seed model and batch, as functions,
    through the cllm on the path: a checkout from before the training step was one function
    (optim.train_step) gets the calls that function makes (norm, clipping, AdamW)."""
    from cllm import Model, ModelConfig, optim
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    idx, targets = batch()
    optimizer = optim.AdamW(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def fwd_bwd():
        model.loss_and_grads(idx, targets, spheres=spheres, threads=threads)

    if hasattr(optim, "train_step"):
        schedule = optim.Schedule(lr=1e-4, min_lr=1e-5, warmup=0, total_steps=1000)

        def step():
            optim.train_step(model, optimizer, schedule, idx, targets, 1.0, spheres, threads)
    else:
        def step():
            fwd_bwd()
            scale = optim.clip_scale(optim.grad_norm(model.grad_flat, threads), 1.0)
            optimizer.step(model.grad_flat, grad_scale=scale, threads=threads)
    return fwd_bwd, step


def cllm_worker(threads: int, steps: int, spheres: int) -> dict:
    fwd_bwd, step = cllm_steps(threads, spheres)
    return dict(fwd_bwd=median_seconds(fwd_bwd, steps), train=median_seconds(step, steps),
                rss_mb=peak_rss_mb())


def step_server(threads: int, spheres: int) -> None:
    """Worker of --baseline: one untimed step, "ready", then a timed step per line read; at
    the end of input, its peak RSS."""
    _, step = cllm_steps(threads, spheres)
    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)
    print(json.dumps(dict(rss_mb=peak_rss_mb())), flush=True)


def side_by_side(sources: dict, pairs: int, threads: int, spheres: int) -> dict:
    """{side: (step seconds, in turn order; peak RSS MB)} of step servers taking turns."""
    servers = {name: subprocess.Popen(
        [sys.executable, __file__, "--worker", "serve", "--threads", str(threads),
         "--spheres", str(spheres)], env=thread_env(threads, source), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE) for name, source in sources.items()}
    try:
        for name, server in servers.items():
            if server.stdout.readline().strip() != "ready":
                raise SystemExit(f"the {name} step server failed to start")
        seconds = {name: [] for name in servers}
        for pair in range(pairs):
            for name in (list(servers) if pair % 2 == 0 else list(servers)[::-1]):
                servers[name].stdin.write("step\n")
                servers[name].stdin.flush()
                seconds[name].append(float(servers[name].stdout.readline()))
        results = {}
        for name, server in servers.items():
            out, _ = server.communicate(timeout=60)
            results[name] = (seconds[name], json.loads(out.strip().splitlines()[-1])["rss_mb"])
        return results
    finally:
        for server in servers.values():
            server.kill()


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
    ap.add_argument("--pairs", type=int, default=20,
                    help="with --baseline: pairs of steps, one of each side, taking turns")
    ap.add_argument("--worker", choices=["cllm", "torch", "serve"])
    args = ap.parse_args()
    if args.worker == "cllm":
        print(json.dumps(cllm_worker(args.threads, args.steps, args.spheres)))
        return
    if args.worker == "torch":
        print(json.dumps(torch_worker(args.threads, args.steps)))
        return
    if args.worker == "serve":
        step_server(args.threads, args.spheres)
        return

    from cllm import ModelConfig
    config = ModelConfig(**SEED_CONFIG)
    flops = train_flops_per_token(config, T) * B * T
    peak = matmul_peak_gflops(args.threads)

    def rate(sec: float) -> str:
        return (f"{sec:6.2f} s/step {B * T / sec:7.0f} tokens/s {flops / sec / 1e9:6.1f} "
                f"GFLOP/s = {flops / sec / 1e9 / peak:4.0%} of peak")

    header = (f"seed configuration, B={B} T={T}, {args.threads} threads, "
              f"{config.num_parameters() / 1e6:.1f}M parameters; {machine_line()}")
    if args.baseline is not None:
        runs = side_by_side({"cllm": REPO / "src", "baseline": args.baseline / "src"},
                            args.pairs, args.threads, args.spheres)
        print(f"{header}; load average {os.getloadavg()[0]:.2f}")
        print(f"float32 matmul peak (NumPy, 2048^3): {peak:.0f} GFLOP/s")
        print(f"whole training steps, {args.pairs} pairs taking turns:")
        for name, (seconds, rss) in runs.items():
            print(f"{name:8s} median {rate(statistics.median(seconds))}; peak RSS {rss:.0f} MB")
        speed = sorted(b / a for a, b in zip(runs["cllm"][0], runs["baseline"][0]))
        q1, _, q3 = statistics.quantiles(speed, n=4)
        print(f"cllm / baseline speed: {statistics.median(speed):.3f}x (median of the pairs' "
              f"ratios; quartiles {q1:.3f}, {q3:.3f}; range {speed[0]:.3f} to {speed[-1]:.3f})")
        print(f"cllm / baseline peak RSS: {runs['cllm'][1] / runs['baseline'][1]:.2f}x")
        return

    results = {"cllm": run_worker(__file__, "cllm", "--threads", str(args.threads), "--steps",
                                  str(args.steps), "--spheres", str(args.spheres),
                                  threads=args.threads)}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            results["pytorch"] = run_worker(__file__, "torch", "--threads", str(args.threads),
                                            "--steps", str(args.steps), threads=args.threads)
        except ImportError:
            print("PyTorch or transformers is not installed: timing cllm alone")
    print(f"{header}; load average {os.getloadavg()[0]:.2f}")
    print(f"float32 matmul peak (NumPy, 2048^3): {peak:.0f} GFLOP/s")
    for name, r in results.items():
        for kind in ("fwd_bwd", "train"):
            print(f"{name:8s} {kind:8s} {rate(r[kind])}")
        print(f"{name:8s} peak RSS {r['rss_mb']:.0f} MB")
    if "pytorch" in results:
        torch_run = results["pytorch"]
        for kind in ("fwd_bwd", "train"):
            print(f"cllm / pytorch {torch_run['version']} {kind}: "
                  f"{torch_run[kind] / results['cllm'][kind]:.3f}x")
        print(f"cllm / pytorch peak RSS: {results['cllm']['rss_mb'] / torch_run['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
