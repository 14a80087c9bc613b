"""The fused AdamW and the gradient norm against float64 NumPy, and their determinism."""
import numpy as np
import pytest

from cllm import Model, ModelConfig
from cllm.optim import AdamW, clip_scale, grad_norm


def adamw_reference(p, grads, lr, beta1, beta2, eps, wd, decay_mask, scales):
    """Textbook AdamW (decoupled decay) in float64 over a list of gradients."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, s) in enumerate(zip(grads, scales), start=1):
        g = g.astype(np.float64) * s
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        mhat, vhat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * decay_mask * p)
    return p


def small_model(tied=True):
    config = ModelConfig(vocab_size=37, n_ctx=8, n_embd=16, n_layer=2, n_head=2, tie_embeddings=tied)
    return Model.create(config, seed=3)


@pytest.mark.parametrize("tied", [True, False])
def test_adamw_matches_float64_reference(tied):
    model = small_model(tied)
    rng = np.random.default_rng(0)
    start = model.flat.copy()
    decay_mask = np.zeros(model.flat.size)
    for name, (offset, shape) in model.config.layout()[0].items():
        decay_mask[offset:offset + int(np.prod(shape))] = len(shape) >= 2
    grads = [rng.standard_normal(model.flat.size).astype(np.float32) for _ in range(5)]
    scales = [1.0, 0.5, 1.0, 0.25, 1.0]
    opt = AdamW(model, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g, s in zip(grads, scales):
        opt.step(g, grad_scale=s, threads=2)
    expected = adamw_reference(start, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1, decay_mask, scales)
    assert np.abs(model.flat - expected).max() < 1e-5
    # LayerNorm weights and biases are not decayed; 2-D weights are
    assert decay_mask[model.config.layout()[0]["wte"][0]] == 1
    assert decay_mask[model.config.layout()[0]["h.0.ln_1.weight"][0]] == 0


def test_adamw_and_norm_are_bitwise_identical_for_every_thread_count():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(small_model().flat.size).astype(np.float32) for _ in range(3)]
    results = []
    for threads in (1, 2, 3):
        model = small_model()
        opt = AdamW(model, lr=1e-3)
        norms = [grad_norm(g, threads) for g in grads]
        for g in grads:
            opt.step(g, threads=threads)
        results.append((model.flat.copy(), opt.m.copy(), opt.v.copy(), norms))
    for flat, m, v, norms in results[1:]:
        assert np.array_equal(flat, results[0][0])
        assert np.array_equal(m, results[0][1]) and np.array_equal(v, results[0][2])
        assert norms == results[0][3]


def test_grad_norm_and_clip_scale():
    g = np.random.default_rng(2).standard_normal(200_001).astype(np.float32)
    assert abs(grad_norm(g, 2) - np.linalg.norm(g.astype(np.float64))) < 1e-9 * np.linalg.norm(g)
    assert clip_scale(0.5, 1.0) == 1.0
    assert abs(clip_scale(4.0, 1.0) * 4.0 - 1.0) < 1e-6
