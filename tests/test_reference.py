"""The float64 reference GPT-2 against central finite differences and known properties."""
import numpy as np
import pytest
from scipy.special import erf

import reference as ref
from cllm.config import GPT2_SWITCHES, ModelConfig

FD_STEP = 1e-5
RTOL = 1e-6

TINY = dict(vocab_size=11, n_ctx=6, n_embd=8, n_layer=2, n_head=2,  # n_ctx > T leaves wpe rows unused
            **GPT2_SWITCHES)
B, T = 3, 5


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def numerical_gradient(objective, x):
    """Central differences of the scalar objective() in every entry of x, which it must read."""
    grad = np.zeros_like(x)
    x_flat, grad_flat = x.reshape(-1), grad.reshape(-1)  # views: writes perturb x itself
    for i in range(x_flat.size):
        original = x_flat[i]
        x_flat[i] = original + FD_STEP
        plus = objective()
        x_flat[i] = original - FD_STEP
        minus = objective()
        x_flat[i] = original
        grad_flat[i] = (plus - minus) / (2 * FD_STEP)
    return grad


def assert_gradient_close(analytic, numeric, name=""):
    assert analytic.shape == numeric.shape, name
    # Entries near zero cannot be relatively accurate, so the absolute slack follows the largest.
    atol = RTOL * np.abs(numeric).max() + 1e-12
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=atol, err_msg=name)


def check_backward(forward, backward, inputs, rng, **options):
    """forward(*inputs, **options) -> (y, cache); backward(dy, cache) -> the gradient of each
    input, in order. Checks them for the objective sum(y * dy) with a random dy."""
    y, cache = forward(*inputs, **options)
    dy = rng.standard_normal(y.shape)
    grads = backward(dy, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    assert len(grads) == len(inputs)

    def objective():
        return np.sum(forward(*inputs, **options)[0] * dy)

    for i, (x, g) in enumerate(zip(inputs, grads)):
        assert_gradient_close(g, numerical_gradient(objective, x), f"input {i}")


def test_layernorm_backward(rng):
    x = rng.standard_normal((B, T, 8)) * 2 + 0.5
    w = 1 + 0.3 * rng.standard_normal(8)
    b = 0.3 * rng.standard_normal(8)
    check_backward(ref.layernorm_forward, ref.layernorm_backward, (x, w, b), rng)


def test_linear_backward(rng):
    x, W, b = rng.standard_normal((B, T, 8)), rng.standard_normal((8, 6)), rng.standard_normal(6)
    check_backward(ref.linear_forward, ref.linear_backward, (x, W, b), rng)


def test_gelu_backward(rng):
    x = 3 * rng.standard_normal((B, T, 8))
    check_backward(ref.gelu_forward, ref.gelu_backward, (x,), rng)


def random_mask_with_diagonal(rng):
    return (rng.random((T, T)) < 0.5) | np.eye(T, dtype=bool)


@pytest.mark.parametrize("mask_kind", ["causal", "random"])
def test_attention_backward(rng, mask_kind):
    mask = None if mask_kind == "causal" else random_mask_with_diagonal(rng)
    qkv = rng.standard_normal((B, T, 3 * 8))
    check_backward(ref.attention_forward, ref.attention_backward, (qkv,), rng, n_head=2, mask=mask)


def test_cross_entropy_backward(rng):
    logits = 2 * rng.standard_normal((B, T, 11))
    targets = rng.integers(0, 11, (B, T))
    targets[0, 1] = targets[2, 4] = -1
    dloss = 1.7
    loss, cache = ref.cross_entropy_forward(logits, targets)
    numeric = numerical_gradient(lambda: dloss * ref.cross_entropy_forward(logits, targets)[0], logits)
    dlogits = ref.cross_entropy_backward(dloss, cache)
    assert_gradient_close(dlogits, numeric)
    assert not dlogits[0, 1].any() and not dlogits[2, 4].any()


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_gradients(rng, tie_embeddings):
    config = ModelConfig(**TINY, tie_embeddings=tie_embeddings)
    params = ref.random_params(config, rng, scale=0.3)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[0, 0] = targets[1, 3] = targets[2, 4] = -1
    loss, grads = ref.gpt2_loss_and_grads(params, config, idx, targets)

    assert list(grads) == [name for name, _ in config.tensor_shapes()]
    assert np.isclose(loss, ref.cross_entropy_forward(ref.gpt2_forward(params, config, idx), targets)[0])
    for name, p in params.items():
        numeric = numerical_gradient(lambda: ref.gpt2_loss_and_grads(params, config, idx, targets)[0], p)
        assert_gradient_close(grads[name], numeric, name)
    assert not grads["wpe"][T:].any()


def test_all_targets_ignored_raises(rng):
    config = ModelConfig(**TINY)
    params = ref.random_params(config, rng)
    idx = rng.integers(0, config.vocab_size, (B, T))
    with pytest.raises(ValueError, match="zero targets"):
        ref.gpt2_loss_and_grads(params, config, idx, np.full((B, T), -1))


def test_out_of_range_inputs_raise(rng):
    config = ModelConfig(**TINY)
    params = ref.random_params(config, rng)
    idx = rng.integers(0, config.vocab_size, (B, T))
    with pytest.raises(ValueError, match="token ids"):
        ref.gpt2_forward(params, config, np.full((B, T), config.vocab_size))
    with pytest.raises(ValueError, match="n_ctx"):
        ref.gpt2_forward(params, config, np.zeros((B, config.n_ctx + 1), dtype=int))
    with pytest.raises(ValueError, match="targets must lie"):
        ref.gpt2_loss_and_grads(params, config, idx, np.full((B, T), -2))


def test_layernorm_normalises():
    x = np.random.default_rng(0).standard_normal((4, 16)) * 5 + 3
    y, _ = ref.layernorm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), 1 / (1 + ref.LAYERNORM_EPS / x.var(axis=-1)), rtol=1e-12)


def test_gelu_is_close_to_exact_gelu():
    x = np.linspace(-6, 6, 241)
    y, _ = ref.gelu_forward(x)
    exact = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    np.testing.assert_allclose(y, exact, atol=1e-3)  # the tanh form's known approximation error
    assert not np.allclose(y, exact, atol=1e-6)      # but it is the approximation, not exact GELU


def test_attention_is_causal_by_default(rng):
    qkv = rng.standard_normal((B, T, 3 * 8))
    y, _ = ref.attention_forward(qkv, n_head=2)
    changed = qkv.copy()
    changed[:, 3:] = rng.standard_normal(changed[:, 3:].shape)
    y_changed, _ = ref.attention_forward(changed, n_head=2)
    np.testing.assert_array_equal(y[:, :3], y_changed[:, :3])
    # The first query sees only the first key, so it returns that key's value unchanged.
    np.testing.assert_allclose(y[:, 0], qkv[:, 0, 16:], rtol=1e-12)


def test_attention_weights_follow_scaled_scores(rng):
    """One head, two keys: the second query weighs the two values by softmax(q.k / sqrt(hd))."""
    hd = 4
    q, k, v = (rng.standard_normal((1, 2, hd)) for _ in range(3))
    y, _ = ref.attention_forward(np.concatenate([q, k, v], axis=-1), n_head=1)
    scores = k[0] @ q[0, 1] / np.sqrt(hd)
    weights = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(y[0, 1], weights @ v[0], rtol=1e-12)


def test_attention_mask_validation(rng):
    qkv = rng.standard_normal((1, T, 3 * 8))
    no_keys_for_query_2 = ref.causal_mask(T)
    no_keys_for_query_2[2] = False
    with pytest.raises(ValueError, match="at least one key"):
        ref.attention_forward(qkv, 2, mask=no_keys_for_query_2)
    with pytest.raises(ValueError, match="boolean"):
        ref.attention_forward(qkv, 2, mask=np.ones((T, T)))


def test_cross_entropy_values():
    V = 7
    loss, _ = ref.cross_entropy_forward(np.zeros((2, 3, V)), np.array([[0, 1, -1], [6, -1, 2]]))
    assert np.isclose(loss, np.log(V))
    logits = np.array([[2.0, 0.0, -1.0]])
    loss, _ = ref.cross_entropy_forward(logits, np.array([0]))
    assert np.isclose(loss, -np.log(np.exp(2.0) / np.exp(logits).sum()))


def test_untied_head_equal_to_wte_matches_tied(rng):
    tied = ModelConfig(**TINY, tie_embeddings=True)
    untied = ModelConfig(**TINY, tie_embeddings=False)
    params = ref.random_params(tied, rng)
    idx = rng.integers(0, tied.vocab_size, (B, T))
    np.testing.assert_array_equal(ref.gpt2_forward(params, tied, idx),
                                  ref.gpt2_forward({**params, "lm_head.weight": params["wte"]}, untied, idx))


def test_model_is_causal(rng):
    config = ModelConfig(**TINY)
    params = ref.random_params(config, rng)
    idx = rng.integers(0, config.vocab_size, (B, T))
    changed = idx.copy()
    changed[:, 2] = (changed[:, 2] + 1) % config.vocab_size
    logits, logits_changed = ref.gpt2_forward(params, config, idx), ref.gpt2_forward(params, config, changed)
    np.testing.assert_array_equal(logits[:, :2], logits_changed[:, :2])
    assert not np.allclose(logits[:, 2:], logits_changed[:, 2:])


def test_random_params_shapes_and_layernorm_weights(rng):
    config = ModelConfig(**TINY, tie_embeddings=False)
    params = ref.random_params(config, rng, scale=0.1)
    assert [(n, p.shape) for n, p in params.items()] == config.tensor_shapes()
    assert all(p.dtype == np.float64 for p in params.values())
    assert abs(params["ln_f.weight"].mean() - 1) < 0.2 and abs(params["ln_f.bias"].mean()) < 0.2
    assert params["h.1.mlp.c_fc.bias"].any()
