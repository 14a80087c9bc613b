"""The Cython core against the float64 reference: each layer, the whole model, determinism."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import reference as ref
from cllm import Model, ModelConfig, _core
from cllm.config import GPT2_SWITCHES


def rel_err(actual, expected, floor=1e-30):
    """Largest absolute difference relative to the largest magnitude of the expected tensor.

    `floor` bounds the scale from below: a gradient that cancels to almost nothing is only
    computable in float32 to the precision of the terms that cancelled."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.abs(expected).max(), floor)
    return float(np.abs(np.asarray(actual, dtype=np.float64) - expected).max() / scale)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- each layer ----------------------------------------------------------------------------

def test_layernorm_forward_backward(rng):
    x, w, b = rng.standard_normal((13, 24)) * 3 + 1, 1 + rng.standard_normal(24) * 0.3, rng.standard_normal(24)
    dy = rng.standard_normal((13, 24))
    out, mean, rstd = _core.layer_layernorm(f32(x), f32(w), f32(b))
    y_ref, cache = ref.layernorm_forward(x, w, b)
    assert rel_err(out, y_ref) < 1e-5
    assert rel_err(mean, x.mean(axis=1)) < 1e-5
    dx, dw, db = _core.layer_layernorm_backward(f32(dy), f32(x), f32(w), mean, rstd)
    for got, want in zip((dx, dw, db), ref.layernorm_backward(dy, cache)):
        assert rel_err(got, want) < 1e-5


def test_linear_forward_backward(rng):
    x, W, b = rng.standard_normal((17, 12)), rng.standard_normal((12, 20)), rng.standard_normal(20)
    dy = rng.standard_normal((17, 20))
    y_ref, cache = ref.linear_forward(x, W, b)
    assert rel_err(_core.layer_linear(f32(x), f32(W), f32(b)), y_ref) < 1e-5
    for got, want in zip(_core.layer_linear_backward(f32(dy), f32(x), f32(W)),
                         ref.linear_backward(dy, cache)):
        assert rel_err(got, want) < 1e-5


def test_gelu_forward_backward(rng):
    x = np.concatenate([rng.standard_normal(500) * 3, [0.0, -1e-8, 1e-8, -30.0, 30.0, 100.0, -100.0]])
    dy = rng.standard_normal(x.size)
    y_ref, cache = ref.gelu_forward(x)
    assert np.abs(_core.layer_gelu(f32(x)) - y_ref).max() < 1e-5 * np.abs(x).max()
    assert rel_err(_core.layer_gelu_backward(f32(dy), f32(x)), ref.gelu_backward(dy, cache)) < 1e-5


@pytest.mark.parametrize("T, C, H", [(1, 24, 4), (2, 24, 4), (7, 24, 4), (16, 24, 4),
                                     (37, 96, 2), (70, 64, 2)])
def test_causal_attention_forward_backward(rng, T, C, H):
    nb = 3
    qkv = rng.standard_normal((nb, T, 3 * C))
    dy = rng.standard_normal((nb, T, C))
    out, att = _core.layer_attention(f32(qkv), H)
    y_ref, cache = ref.attention_forward(qkv, H)
    assert rel_err(out, y_ref) < 1e-5
    assert rel_err(att, cache[3]) < 1e-5
    dqkv = _core.layer_attention_backward(f32(dy), f32(qkv), H)
    assert rel_err(dqkv, ref.attention_backward(dy, cache)) < 1e-4


def test_softmax_crossentropy_forward_backward(rng):
    N, V = 9, 301
    logits = rng.standard_normal((N, V)) * 4
    targets = rng.integers(0, V, N)
    targets[[2, 5]] = -1
    loss_ref, cache = ref.cross_entropy_forward(logits, targets)
    n = int((targets >= 0).sum())
    total, dlogits = _core.layer_crossentropy(f32(logits), targets.astype(np.int64), 1.0 / n)
    assert abs(total / n - loss_ref) < 1e-5 * abs(loss_ref)
    assert rel_err(dlogits, ref.cross_entropy_backward(1.0, cache)) < 1e-5
    assert not dlogits[[2, 5]].any()


# ---- the whole model ---------------------------------------------------------------------

def model_with_params(config, rng, scale=0.1):
    params64 = ref.random_params(config, rng, scale=scale)
    model = Model(config)
    for name, value in params64.items():
        model.params[name][...] = value
    # the reference sees exactly the float32 weights the core uses
    return model, {k: v.astype(np.float64) for k, v in model.params.items()}


def check_against_reference(config, B, T, rng, spheres=12, threads=2, ignore_fraction=0.2):
    model, params64 = model_with_params(config, rng)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[rng.random((B, T)) < ignore_fraction] = -1
    targets[0, 0] = rng.integers(0, config.vocab_size)  # at least one target
    logits = model.forward(idx, spheres=spheres, threads=threads)
    logits_ref = ref.gpt2_forward(params64, config, idx)
    assert rel_err(logits, logits_ref) < 1e-4
    (loss, ce), grads = model.loss_and_grads(idx, targets, spheres=spheres, threads=threads)
    loss_ref, grads_ref = ref.gpt2_loss_and_grads(params64, config, idx, targets)
    assert abs(loss - loss_ref) <= 1e-4 * abs(loss_ref)
    ce_ref = ref.cross_entropy_forward(logits_ref, targets)[0]
    assert abs(ce - ce_ref) <= 1e-4 * abs(ce_ref)
    assert abs(model.loss(idx, targets, spheres=spheres, threads=threads).loss - loss_ref) <= 1e-4 * abs(loss_ref)
    assert list(grads) == list(grads_ref)
    grad_scale = max(np.abs(g).max() for g in grads_ref.values())
    for name in grads:
        assert rel_err(grads[name], grads_ref[name], floor=1e-2 * grad_scale) < 1e-3, name


@pytest.mark.parametrize("tied", [True, False])
def test_model_matches_reference(rng, tied):
    config = ModelConfig(vocab_size=97, n_ctx=24, n_embd=32, n_layer=3, n_head=4, tie_embeddings=tied,
                         **GPT2_SWITCHES)
    check_against_reference(config, B=5, T=20, rng=rng, spheres=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_model_matches_reference_random_shapes(data):
    n_head = data.draw(st.integers(1, 4))
    n_embd = n_head * data.draw(st.integers(1, 6))
    assume(n_embd >= 2)  # LayerNorm over one feature has no gradient to check
    config = ModelConfig(
        vocab_size=data.draw(st.integers(2, 60)), n_ctx=data.draw(st.integers(1, 12)),
        n_embd=n_embd, n_layer=data.draw(st.integers(1, 3)),
        n_head=n_head, n_inner=data.draw(st.none() | st.integers(1, 20)),
        tie_embeddings=data.draw(st.booleans()), **GPT2_SWITCHES)
    B = data.draw(st.integers(1, 15))
    T = data.draw(st.sampled_from(sorted({1, config.n_ctx, max(1, config.n_ctx // 2)})))
    spheres = data.draw(st.integers(1, 13))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    check_against_reference(config, B, T, rng, spheres=spheres, threads=data.draw(st.integers(1, 3)))


def check_finite_differences(config, rng, T, per_tensor=4):
    """The core's float32 gradient against central differences of the float64 reference's
    training loss, at a few coordinates of every tensor."""
    model, params64 = model_with_params(config, rng, scale=0.3)
    idx, targets = rng.integers(0, config.vocab_size, (3, T)), rng.integers(0, config.vocab_size, (3, T))
    targets[1, 2] = -1
    _, grads = model.loss_and_grads(idx, targets, spheres=2, threads=2)
    h = 1e-6
    for name, p in params64.items():
        flat = p.reshape(-1)
        for i in rng.choice(flat.size, size=min(per_tensor, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + h
            up = ref.gpt2_loss(params64, config, idx, targets)
            flat[i] = old - h
            down = ref.gpt2_loss(params64, config, idx, targets)
            flat[i] = old
            numeric = (up - down) / (2 * h)
            assert abs(grads[name].reshape(-1)[i] - numeric) < 1e-4 + 1e-3 * abs(numeric), (name, i)


def test_gradients_match_finite_differences(rng):
    config = ModelConfig(vocab_size=13, n_ctx=6, n_embd=8, n_layer=2, n_head=2, tie_embeddings=False,
                         **GPT2_SWITCHES)
    check_finite_differences(config, rng, T=6)


# ---- the spheres ---------------------------------------------------------------------------

@pytest.mark.parametrize("spheres", [1, 5, 12])
def test_bitwise_identical_for_every_thread_count(rng, spheres):
    config = ModelConfig(vocab_size=71, n_ctx=16, n_embd=24, n_layer=2, n_head=3, **GPT2_SWITCHES)
    model, _ = model_with_params(config, rng)
    idx, targets = rng.integers(0, 71, (9, 16)), rng.integers(-1, 71, (9, 16))
    results = []
    for threads in (1, 2, 3):
        loss, grads = model.loss_and_grads(idx, targets, spheres=spheres, threads=threads)
        results.append((loss, model.grad_flat.copy(),
                        model.forward(idx, spheres=spheres, threads=threads)))
    for loss, grad, logits in results[1:]:
        assert loss == results[0][0]
        assert np.array_equal(grad, results[0][1])
        assert np.array_equal(logits, results[0][2])


@pytest.mark.parametrize("spheres", [2, 7, 12])
def test_gradient_is_the_left_to_right_sum_of_the_sphere_gradients(rng, spheres):
    """CRYSTALLINE.md section 1: ((g0 + g1) + g2) + ..., in float32, whatever the thread count;
    the sphere gradients come from the core one by one, the sum from NumPy."""
    config = ModelConfig(vocab_size=53, n_ctx=8, n_embd=16, n_layer=2, n_head=2)
    model, _ = model_with_params(config, rng)
    idx, targets = rng.integers(0, 53, (14, 8)), rng.integers(-1, 53, (14, 8))
    keep = np.zeros((spheres, model.flat.size), np.float32)
    model.core.sphere_losses_and_grads(idx, targets, spheres, 0, spheres, 1, keep)
    expected = keep[0].copy()
    for g in keep[1:]:
        expected += g
    for threads in (1, 2, 3, 5):
        model.loss_and_grads(idx, targets, spheres=spheres, threads=threads)
        assert np.array_equal(model.grad_flat, expected)


def test_grads_are_views_into_one_flat_buffer(rng):
    config = ModelConfig(vocab_size=11, n_ctx=4, n_embd=8, n_layer=1, n_head=2)
    model, _ = model_with_params(config, rng)
    _, grads = model.loss_and_grads(rng.integers(0, 11, (2, 4)), rng.integers(0, 11, (2, 4)))
    for g in grads.values():
        assert np.shares_memory(g, model.grad_flat)
    for p in model.params.values():
        assert np.shares_memory(p, model.flat)


# ---- the model API -----------------------------------------------------------------------

def test_create_is_gpt2_init_and_reproducible():
    config = ModelConfig(vocab_size=500, n_ctx=64, n_embd=64, n_layer=4, n_head=4, tie_embeddings=False)
    a, b = Model.create(config, seed=7), Model.create(config, seed=7)
    assert np.array_equal(a.flat, b.flat)
    assert not np.array_equal(a.flat, Model.create(config, seed=8).flat)
    assert abs(a.params["wte"].std() - 0.02) < 0.001
    assert abs(a.params["h.0.mlp.c_fc.weight"].std() - 0.02) < 0.001
    for name in ("h.1.attn.c_proj.weight", "h.3.mlp.c_proj.weight"):
        assert abs(a.params[name].std() - 0.02 / np.sqrt(8)) < 0.0005
    assert (a.params["h.2.ln_1.weight"] == 1).all() and not a.params["h.2.ln_1.bias"].any()
    assert not a.params["h.0.attn.c_attn.bias"].any()
    assert a.params["lm_head.weight"].shape == (500, 64)
    assert a.num_parameters == sum(p.size for p in a.params.values())


def test_writing_params_changes_the_model(rng):
    config = ModelConfig(vocab_size=11, n_ctx=4, n_embd=8, n_layer=1, n_head=2)
    model = Model.create(config)
    idx = rng.integers(0, 11, (1, 4))
    before = model.forward(idx)
    model.params["ln_f.bias"][...] = 1.0
    assert not np.array_equal(before, model.forward(idx))


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), "vocab_size"), (dict(n_ctx=-1), "n_ctx"), (dict(n_embd=0), "n_embd"),
    (dict(n_layer=0), "n_layer"), (dict(n_head=0), "n_head"), (dict(n_inner=0), "n_inner"),
    (dict(n_embd=30, n_head=4), "divisible"), (dict(vocab_size=2.5), "integer"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_invalid_config(kwargs, message):
    base = dict(vocab_size=10, n_ctx=8, n_embd=16, n_layer=1, n_head=4)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **kwargs})


@pytest.mark.parametrize("idx, targets, kwargs, message", [
    ([[0, 1, 11]], None, {}, "outside"),
    ([[0, -1]], None, {}, "outside"),
    ([[0] * 9], None, {}, "exceeds the context"),
    ([0, 1], None, {}, "shape"),
    ([[[0, 1]]], None, {}, "shape"),
    ([[0.0, 1.0]], None, {}, "integer"),
    (np.zeros((0, 3), int), None, {}, "B >= 1"),
    ([[0, 1]], [[0, 1, 2]], {}, "targets shape"),
    ([[0, 1]], [[0, -2]], {}, "outside"),
    ([[0, 1]], [[-1, -1]], {}, "no token"),
    ([[0, 1]], [[0, 1]], dict(spheres=0), "spheres"),
    ([[0, 1]], [[0, 1]], dict(threads=0), "threads"),
    ([[0, 1]], [[0, 1]], dict(threads=1.5), "threads"),
])
def test_bad_input_raises_value_error(idx, targets, kwargs, message):
    model = Model.create(ModelConfig(vocab_size=11, n_ctx=8, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=message):
        if targets is None:
            model.forward(idx, **kwargs)
        else:
            model.loss_and_grads(idx, targets, **kwargs)
