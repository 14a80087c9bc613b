"""Batch-1 generation of the seed configuration: cllm's KV-cache decoder against Hugging Face
`generate` (KV cache, greedy) with the same weights, and the peak RSS of a one-shot
`cllm infer`.

    python bench/generate.py [--threads 2] [--tokens 200] [--no-torch]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SEED_CONFIG, machine_line, peak_rss_mb, run_measured, run_worker  # noqa: E402

PROMPT_TOKENS = 16


def prompt_ids():
    return np.random.default_rng(0).integers(0, SEED_CONFIG["vocab_size"], PROMPT_TOKENS).tolist()


def cllm_worker(threads: int, tokens: int) -> dict:
    from cllm import Model, ModelConfig
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    model.generate_ids(prompt_ids(), 4, temperature=0, threads=threads)  # untimed warm-up
    start = time.perf_counter()
    ids = model.generate_ids(prompt_ids(), tokens, temperature=0, threads=threads)
    seconds = time.perf_counter() - start
    return dict(tokens_per_s=len(ids) / seconds, ids=ids, rss_mb=peak_rss_mb())


def torch_worker(threads: int, tokens: int) -> dict:
    import torch
    from cllm import Model, ModelConfig
    from hf_gpt2 import hf_model, time_generate
    config = ModelConfig(**SEED_CONFIG)
    model = hf_model(config, Model.create(config, seed=0).params)
    rate, ids = time_generate(model, prompt_ids(), tokens, threads)
    return dict(tokens_per_s=rate, ids=ids, rss_mb=peak_rss_mb(), version=torch.__version__)


def save_seed_model_with_tokenizer(path: str) -> None:
    """The seed configuration with a 30000-token BPE tokenizer trained on the standard
    library's source, as `cllm infer` would meet it."""
    from cllm import Model, ModelConfig
    from cllm.tokenizer import train_bpe
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    tokenizer = train_bpe(texts, SEED_CONFIG["vocab_size"])
    config = ModelConfig(**{**SEED_CONFIG, "vocab_size": tokenizer.get_vocab_size()})
    Model.create(config, seed=0, tokenizer=tokenizer).save(path)


def infer_worker(args) -> dict:
    """Peak RSS (MB) of `python -m cllm infer` on args.model, from a small worker so that the
    process starts from nothing large."""
    _, _, rss = run_measured([sys.executable, "-m", "cllm", "infer", "-m", args.model, "-p",
                              "def main(", "-n", str(args.tokens), "--threads",
                              str(args.threads)], args.threads)
    return dict(rss_mb=rss)


WORKERS = {"cllm": lambda args: cllm_worker(args.threads, args.tokens),
           "torch": lambda args: torch_worker(args.threads, args.tokens),
           "infer": infer_worker}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", choices=list(WORKERS))
    ap.add_argument("--model", help="the .cllm file of the infer worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    common = ["--threads", str(args.threads), "--tokens", str(args.tokens)]
    results = {"cllm": run_worker(__file__, "cllm", *common, threads=args.threads)}
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
            results["hf"] = run_worker(__file__, "torch", *common, threads=args.threads)
        except ImportError:
            print("PyTorch or transformers is not installed: timing cllm alone")
    print(f"seed configuration, batch 1, {PROMPT_TOKENS}-token prompt, {args.tokens} new tokens, "
          f"greedy, {args.threads} threads; {machine_line()}")
    for name, r in results.items():
        print(f"{name:5s} {r['tokens_per_s']:7.1f} tokens/s  (process peak RSS {r['rss_mb']:.0f} MB)")
    if "hf" in results:
        print(f"cllm / Hugging Face {results['hf']['version']}: "
              f"{results['cllm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x; "
              f"same greedy ids: {results['cllm']['ids'] == results['hf']['ids']}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "seed.cllm")
        save_seed_model_with_tokenizer(path)
        infer = run_worker(__file__, "infer", *common, "--model", path, threads=args.threads)
    print(f"one-shot `cllm infer -n {args.tokens}` peak RSS: {infer['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
