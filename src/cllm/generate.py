"""Text generation: sampling over the logits of the core's incremental decoder."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .threads import idle_cores, positive_count
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


def iter_ids(model, ids, max_new_tokens: int = 50, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             threads: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time after the prompt `ids`.

    The key/value cache holds at most n_ctx positions: a longer prompt keeps its last n_ctx
    tokens, and when generation fills the context the window slides, keeping the last half of
    it (re-read into a fresh cache) so that every step sees as much recent text as possible
    without re-reading the whole window per token."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("the prompt is empty: generation needs at least one token")
    V, n_ctx = model.config.vocab_size, model.config.n_ctx
    if min(ids) < 0 or max(ids) >= V:
        raise ValueError(f"prompt ids must lie in [0, {V})")
    threads = positive_count("threads", threads, idle_cores())
    rng = np.random.default_rng(seed)
    decoder = model.core.decoder(threads)
    window = ids[-n_ctx:]
    logits = _read(decoder, window)
    for _ in range(max_new_tokens):
        token = sample(logits, rng, temperature, top_k, top_p)
        yield token
        if len(window) == n_ctx:
            window = window[n_ctx - n_ctx // 2:]
            _read(decoder, window)
        window.append(token)
        logits = decoder.step(token, len(window) - 1)


def _read(decoder, window: list[int]):
    """Fill a fresh cache with the window from position 0; the logits after its last token."""
    logits = None
    for pos, token in enumerate(window):
        logits = decoder.step(token, pos)
    return logits


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
