"""The recursive level: training steps over MPI processes against threads, and what the chain
reduction costs on many machines.

    python bench/scaling.py [--steps 3] [--processes 2] [--no-model]

Measured on this machine, side by side: the seed configuration's training step (B=32, T=128,
12 spheres) at 1 process x N threads and at N processes x 1 thread (cllm.optim.train_step,
the same code `cllm train` runs), tokens/s and, for the processes, the seconds per step spent
in the chain reduction and broadcast (Node Zero's batches, the gradient and loss sums).

Then a cost model of many machines from measured quantities: the per-step compute of one
process, the gradient bytes, and the chain's terms. In the chain, every gradient chunk passes
the ranks one after another, then the last rank broadcasts the sum: with the gradient of G
bytes cut into chunks of c bytes, a link of bandwidth W and latency a,
    chain   (N - 1) (c / W + a) + G / W          (a pipeline: fill, then one gradient)
    bcast   G / W * ceil(log2 N)                  (a binomial tree of whole messages)
against a ring all-reduce's 2 (N - 1) / N G / W + 2 (N - 1) a (which does not keep the order
of one process, so cllm does not use it). Compute falls as 1 / N (each machine runs S / N
spheres; S >= N). Writes bench/out/scaling.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (SEED_CONFIG, machine_line, median_seconds, run_measured,  # noqa: E402
                    train_flops_per_token)

B, T, SPHERES = 32, 128, 12
CHUNK_BYTES = 4 << 20          # cllm.parallel.CHUNK floats
LATENCY_S = 20e-6              # one message on a commodity Ethernet network
GPT2_SMALL = dict(vocab_size=50257, n_ctx=1024, n_embd=768, n_layer=12, n_head=12,
                  n_inner=3072, tie_embeddings=True, init="normal", position="learned",
                  attention="dense", loss="ce")


def worker(steps: int, threads: int) -> dict:
    """One rank of the job (or the only process): median seconds of a training step and of
    its chain reduction alone."""
    from cllm import Model, ModelConfig
    from cllm.optim import AdamW, Schedule, train_step
    from cllm.parallel import ProcessGroup, world_size
    group = ProcessGroup() if world_size() > 1 else None
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    optimizer = AdamW(model)
    schedule = Schedule(1e-4, 1e-5, 0, 100 * steps)
    rng = np.random.default_rng(0)
    x = rng.integers(0, SEED_CONFIG["vocab_size"], (B, T))

    def step():
        train_step(model, optimizer, schedule, x, x, 1.0, SPHERES, threads, group)

    result = dict(step=median_seconds(step, steps))
    if group is not None:
        first, last = group.sphere_block(SPHERES)
        keep = np.zeros((last - first, model.flat.size), np.float32)
        result["chain"] = median_seconds(lambda: group.chain_sum(keep, model.grad_flat), steps)
        if group.rank != 0:
            return {}
    return result


def run_job(processes: int, threads: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--threads",
               str(threads)]
    if processes > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        command = [mpiexec, "-n", str(processes), sys.executable, "-m", "mpi4py", *command[1:]]
    _, out, _ = run_measured(command, threads)
    return json.loads(out.strip().splitlines()[-1])


def projection(config: dict, step_seconds: float, bandwidths: list[float]) -> list[str]:
    """Rows of the cost-model table for 2 to 64 machines."""
    from cllm import ModelConfig
    grad_bytes = 4 * ModelConfig(**config).num_parameters()
    rows = []
    for n in (2, 4, 8, 16, 32, 64):
        cells = []
        for gbit in bandwidths:
            bw = gbit * 1e9 / 8
            chain = (n - 1) * (CHUNK_BYTES / bw + LATENCY_S) + grad_bytes / bw
            bcast = grad_bytes / bw * math.ceil(math.log2(n))
            ring = 2 * (n - 1) / n * grad_bytes / bw + 2 * (n - 1) * LATENCY_S
            step = step_seconds / n + chain + bcast
            tokens = B * T / step
            cells.append(f"{tokens:,.0f} ({step_seconds / (n * step):.0%}; ring "
                         f"{step_seconds / (n * (step_seconds / n + ring)):.0%})")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        result = worker(args.steps, args.threads)
        if result:   # rank 0 (or the only process) reports
            print(json.dumps(result))
        return
    n = args.processes
    load = os.getloadavg()[0]
    threads = run_job(1, n, args.steps)
    processes = run_job(n, 1, args.steps)
    lines = [f"Seed configuration, B={B} T={T}, {SPHERES} spheres; {machine_line()}; load "
             f"average before {load:.2f}", "",
             "| | s/step | tokens/s | chain reduction s/step |", "| --- | --- | --- | --- |",
             f"| 1 process x {n} threads | {threads['step']:.2f} | "
             f"{B * T / threads['step']:,.0f} | |",
             f"| {n} processes x 1 thread | {processes['step']:.2f} | "
             f"{B * T / processes['step']:,.0f} | {processes['chain']:.3f} |", "",
             f"{n} processes reach {threads['step'] / processes['step']:.0%} of the tokens/s "
             f"of {n} threads.", ""]
    # one machine's compute per step, from the threads run: the model scales it to N machines
    one_machine = threads["step"]
    from cllm import ModelConfig
    seed_flops = train_flops_per_token(ModelConfig(**SEED_CONFIG), T)
    gpt2_flops = train_flops_per_token(ModelConfig(**GPT2_SMALL), T)
    bandwidths = [10, 25, 100]
    header = ["| machines | " + " | ".join(f"{g} Gbit/s: tokens/s (efficiency; ring)"
                                           for g in bandwidths) + " |",
              "| --- |" + " --- |" * len(bandwidths)]
    lines += [f"Projected, seed configuration (gradient {4 * ModelConfig(**SEED_CONFIG).num_parameters() / 1e6:.0f} MB, "
              f"{one_machine:.2f} s of compute per step on one machine of {n} cores):", "",
              *header, *projection(SEED_CONFIG, one_machine, bandwidths), "",
              f"Projected, GPT-2 small (gradient {4 * ModelConfig(**GPT2_SMALL).num_parameters() / 1e6:.0f} MB, "
              f"compute scaled from the seed step by FLOPs per token at T={T}: "
              f"{one_machine * gpt2_flops / seed_flops:.2f} s):", "",
              *header, *projection(GPT2_SMALL, one_machine * gpt2_flops / seed_flops,
                                   bandwidths)]
    text = "\n".join(lines) + "\n"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
