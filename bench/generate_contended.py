"""Generation when another process takes a core: the seed configuration's int8 and float32
batch-1 decoding, alone and beside a busy process, at fixed thread counts (the decoder driven
step by step) and as `generate_ids` runs it (all usable cores, with its step-time probe).

    python bench/generate_contended.py [--tokens 200]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SEED_CONFIG, machine_line  # noqa: E402

BUSY = "while True: pass"


def fixed_threads(model, prompt, tokens: int, threads: int) -> float:
    """tokens/s of greedy decoding with the decoder held at `threads`."""
    decoder = model.core.decoder(threads)
    logits = decoder.read(prompt)
    start = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + tokens):
        logits = decoder.step(int(np.argmax(logits)), pos)
    return tokens / (time.perf_counter() - start)


def as_generate_runs(model, prompt, tokens: int) -> float:
    start = time.perf_counter()
    model.generate_ids(prompt, tokens, temperature=0)
    return tokens / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    args = ap.parse_args()
    from cllm import Model, ModelConfig
    base = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    prompt = np.random.default_rng(0).integers(0, SEED_CONFIG["vocab_size"], 16).tolist()
    cores = len(os.sched_getaffinity(0))
    print(f"seed configuration, batch 1, {args.tokens} greedy tokens; {machine_line()}")
    print("| weights | beside | 1 thread | " + " | ".join(f"{n} threads" for n in
                                                          range(2, cores + 1))
          + " | generate_ids (default) |")
    print("| --- | --- |" + " --- |" * cores + " --- |")
    for weights in ("int8", "float32"):
        model = base if weights == "float32" else base.quantized(weights)
        as_generate_runs(model, prompt, 8)   # warm-up
        for beside in ("nothing", "a busy process"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if beside != "nothing" else None
            try:
                time.sleep(0.5)
                rates = [fixed_threads(model, prompt, args.tokens, n)
                         for n in range(1, cores + 1)]
                rates.append(as_generate_runs(model, prompt, args.tokens))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            print(f"| {weights} | {beside} | " + " | ".join(f"{r:.0f}" for r in rates) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
