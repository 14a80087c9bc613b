"""Hugging Face GPT-2 (PyTorch, float32) figures on this machine for the seed configuration:
training step time and throughput with and without the optimizer, the process's peak RSS,
batch-1 greedy generation speed, and the same without the optimizer under the other attention
implementation, to show which one Hugging Face's default choice is.

Run from the repository root: PYTHONPATH=src python bench/hf_baseline.py
"""
import os
import resource

import numpy as np

from cllm.config import ModelConfig
from hf_gpt2 import ATTN_IMPLEMENTATION, hf_model, time_generate, time_train_step

SEED_CONFIG = ModelConfig(vocab_size=30000, n_ctx=256, n_embd=384, n_layer=6, n_head=12, n_inner=1536,
                          tie_embeddings=True)
B, T = 32, 128
THREADS = 2
STEPS = 5
PROMPT_TOKENS, NEW_TOKENS = 16, 200


def gpt2_init_params(config, rng):
    """float32 params as GPT-2 initialises them: N(0, 0.02^2) weights and embeddings, zero
    biases, unit LayerNorm weights. Drawn directly in float32 to keep the peak RSS honest."""
    params = {}
    for name, shape in config.tensor_shapes():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape, np.float32)
        elif name.split(".")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_f"]):
            params[name] = np.ones(shape, np.float32)
        else:
            params[name] = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    return params


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report_load():
    # The machine may be shared; a 1-minute load above the thread count means the figures are low.
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")


def report_train_step(label, seconds):
    print(f"{label}: {seconds:.3f} s/step, {B * T / seconds:.0f} tokens/s")


def main():
    rng = np.random.default_rng(0)
    params = gpt2_init_params(SEED_CONFIG, rng)
    idx = rng.integers(0, SEED_CONFIG.vocab_size, (B, T))
    targets = rng.integers(0, SEED_CONFIG.vocab_size, (B, T))
    prompt = rng.integers(0, SEED_CONFIG.vocab_size, PROMPT_TOKENS).tolist()
    other_attn_implementation = "eager" if ATTN_IMPLEMENTATION == "sdpa" else "sdpa"

    report_load()
    print(f"{SEED_CONFIG}, B={B}, T={T}, threads={THREADS}, median of {STEPS} steps after a warmup step")
    model = hf_model(SEED_CONFIG, params, ATTN_IMPLEMENTATION)
    print(f"peak RSS after building the model: {peak_rss_mib():.0f} MiB")
    report_train_step(f"{ATTN_IMPLEMENTATION} forward+backward+clip+AdamW",
                      time_train_step(model, idx, targets, THREADS, STEPS, optimizer=True))
    report_train_step(f"{ATTN_IMPLEMENTATION} forward+backward",
                      time_train_step(model, idx, targets, THREADS, STEPS, optimizer=False))
    print(f"peak RSS after training: {peak_rss_mib():.0f} MiB")
    tokens_per_s, _ = time_generate(model, prompt, NEW_TOKENS, THREADS)
    print(f"{ATTN_IMPLEMENTATION} generation, batch 1, {PROMPT_TOKENS}-token prompt, "
          f"{NEW_TOKENS} new tokens: {tokens_per_s:.1f} tokens/s")

    del model
    other = hf_model(SEED_CONFIG, params, other_attn_implementation)
    report_train_step(f"{other_attn_implementation} forward+backward",
                      time_train_step(other, idx, targets, THREADS, STEPS, optimizer=False))
    tokens_per_s, _ = time_generate(other, prompt, NEW_TOKENS, THREADS)
    print(f"{other_attn_implementation} generation: {tokens_per_s:.1f} tokens/s")
    report_load()


if __name__ == "__main__":
    main()
