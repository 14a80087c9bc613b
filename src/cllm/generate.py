"""Text generation: sampling over the logits of the core's incremental decoder."""
from __future__ import annotations

import statistics
import time
from typing import Iterator

import numpy as np

from .threads import positive_count, usable_cores
from .tokenizer import decode, encode


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float,
           top_k: int | None, top_p: float | None) -> int:
    """One token id from logits (V). temperature 0 is greedy (the first maximum)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cumulative, top_p)) + 1]  # smallest set reaching top_p
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(p.size, p=p))


class StepThreads:
    """How many of a decoder's threads its next step runs on. A step synchronises its threads
    a few dozen times, so it slows to a crawl when another process takes one of their cores:
    every matrix product then waits for the thread that shares it. Now and then one step runs
    on one thread fewer or one more (in turn, within 1..most_threads), and runs on if it beat
    the median of the recent steps. A probe that loses doubles the steps to the next one (up to
    MOST_APART), so that a steady machine pays for few slow probes; one that wins, or steps
    turning SLOWER times slower than their best, bring the next probe close again. The text
    never depends on the thread count."""
    FIRST_APART = 32
    MOST_APART = 512
    SLOWER = 2.0
    KEPT = 3        # recent step times; their median is what a probe must beat

    def __init__(self, decoder, clock=time.perf_counter):
        self.decoder = decoder
        self.clock = clock
        self.chosen = decoder.most_threads
        self.recent: list[float] = []
        self.best = float("inf")
        self.apart = self.FIRST_APART
        self.next_probe = 1
        self.probes = 0
        self.steps = 0

    def run(self, step, *args):
        """step(*args) timed on the chosen threads, or on the probed count."""
        probing = self.decoder.most_threads > 1 and self.steps == self.next_probe
        threads = self.chosen
        if probing:
            fewer = self.probes % 2 == 0
            if fewer and self.chosen > 1 or self.chosen == self.decoder.most_threads:
                threads = self.chosen - 1
            else:
                threads = self.chosen + 1
            self.probes += 1
        self.decoder.threads = threads
        start = self.clock()
        result = step(*args)
        seconds = self.clock() - start
        if probing:
            if seconds < statistics.median(self.recent):
                self.chosen, self.recent, self.best = threads, [seconds], seconds
                self.apart = self.FIRST_APART
            else:
                self.apart = min(2 * self.apart, self.MOST_APART)
            self.next_probe = self.steps + self.apart
        else:
            self.recent = (self.recent + [seconds])[-self.KEPT:]
            typical = statistics.median(self.recent)
            self.best = min(self.best, typical)
            if typical > self.SLOWER * self.best and self.next_probe > self.steps + 1:
                self.next_probe, self.apart = self.steps + 1, self.FIRST_APART
        self.steps += 1
        return result


def _check_prompt(ids, V: int) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("the prompt is empty: generation needs at least one token")
    if min(ids) < 0 or max(ids) >= V:
        raise ValueError(f"prompt ids must lie in [0, {V})")
    return ids


def iter_batch(model, prompts, max_new_tokens: int = 50, temperature: float = 0.8,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               threads: int | None = None) -> Iterator[list[int]]:
    """Yield, step by step, the new token id of every prompt (lists of ids), all decoded
    together: each step runs one row per sequence through the model, reading each weight once
    for all of them. Sequence i samples with the generator seeded `seed + i`, so the first
    continues exactly as it would alone.

    A prompt is read as one block of rows. The key/value cache holds at most n_ctx positions:
    a longer prompt keeps its last n_ctx tokens, and when generation fills the context the
    window slides, keeping the last half of it (re-read into the cache) so that every step
    sees as much recent text as possible without re-reading the whole window per token."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    V, n_ctx = model.config.vocab_size, model.config.n_ctx
    windows = [_check_prompt(ids, V)[-n_ctx:] for ids in prompts]
    if not windows:
        raise ValueError("no prompt: generation needs at least one")
    threads = positive_count("threads", threads, usable_cores())
    rngs = [np.random.default_rng(None if seed is None else seed + i)
            for i in range(len(windows))]
    decoder = model.core.decoder(threads, len(windows))
    step_threads = StepThreads(decoder)
    logits = np.stack([decoder.read(window, seq) for seq, window in enumerate(windows)])
    for step in range(max_new_tokens):
        tokens = [sample(row, rng, temperature, top_k, top_p) for row, rng in zip(logits, rngs)]
        yield tokens
        if step == max_new_tokens - 1:
            return
        for seq, window in enumerate(windows):
            if len(window) == n_ctx:
                del window[:n_ctx - n_ctx // 2]
                decoder.read(window, seq)
        for window, token in zip(windows, tokens):
            window.append(token)
        logits = step_threads.run(decoder.decode, tokens,
                                  [len(window) - 1 for window in windows])


def iter_ids(model, ids, **kwargs) -> Iterator[int]:
    """Yield new token ids one at a time after the prompt `ids` (see iter_batch)."""
    for tokens in iter_batch(model, [ids], **kwargs):
        yield tokens[0]


def iter_text(model, prompt: str, **kwargs) -> Iterator[str]:
    """Yield the generated text in pieces as tokens arrive; a piece is held back while it ends
    inside a multi-byte character that the next tokens complete."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: give token ids to generate_ids instead")
    if not prompt:
        raise ValueError("the prompt is empty")
    new_ids: list[int] = []
    emitted = 0
    for token in iter_ids(model, encode(model.tokenizer, prompt), **kwargs):
        new_ids.append(token)
        text = decode(model.tokenizer, new_ids)
        if not text.endswith("\ufffd") and len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    text = decode(model.tokenizer, new_ids)
    if len(text) > emitted:
        yield text[emitted:]
