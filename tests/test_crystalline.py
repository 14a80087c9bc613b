"""The crystalline switches (CRYSTALLINE.md sections 2 to 5) against the float64 transcription
of the formulas: each table, each layer, the whole model, generation, and the configuration."""
import json
import math

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings, strategies as st

import crystalline_reference as cref
import reference as ref
from cllm import Model, ModelConfig, _core, crystal
from cllm.config import GPT2_SWITCHES
from test_core import (check_against_reference, check_finite_differences, f32,
                       model_with_params, rel_err)
from test_generate import greedy_by_full_forwards

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# each switch alone (the others off, whatever the defaults), and all four
SWITCHES = {
    "lattice": {**GPT2_SWITCHES, "init": "lattice"},
    "angular": {**GPT2_SWITCHES, "position": "angular"},
    "ulam": {**GPT2_SWITCHES, "attention": "ulam", "ulam_radius": 1},
    "crystalline": {**GPT2_SWITCHES, "loss": "crystalline", "crystalline_alpha": 0.3},
    "all four": dict(init="lattice", position="angular", attention="ulam", loss="crystalline"),
}


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def crystalline_model(switches, seed=0, n_ctx=24, vocab_size=40, tied=True, n_head=3):
    """A small model with weights larger than the init, for sharper distributions."""
    config = ModelConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_embd=8 * n_head, n_layer=2,
                         n_head=n_head, tie_embeddings=tied, **switches)
    model = Model.create(config, seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.params.values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    return model


# ---- section 2: lattice embeddings ---------------------------------------------------------

def test_primes():
    assert list(crystal.primes(500)) == cref.first_primes(500)
    assert list(crystal.primes(1)) == [2]


def test_lattice_table_equals_the_formula():
    table = crystal.lattice_embeddings(300, 37, 0.02)
    assert np.abs(table - cref.lattice_table(300, 37, 0.02)).max() < 1e-15
    # spread like a Gaussian draw of the same scale
    assert abs(table.std() - 0.02) < 0.002


def test_lattice_init_replaces_wte_only():
    config = ModelConfig(vocab_size=50, n_ctx=8, n_embd=16, n_layer=2, n_head=2, **GPT2_SWITCHES)
    lattice = Model.create(ModelConfig(**{**config.to_dict(), "init": "lattice"}), seed=4)
    normal = Model.create(config, seed=4)
    assert np.array_equal(lattice.params["wte"],
                          cref.lattice_table(50, 16, 0.02).astype(np.float32))
    for name in normal.params:
        if name != "wte":
            assert np.array_equal(lattice.params[name], normal.params[name]), name


# ---- section 3: angular attention ----------------------------------------------------------

def test_angular_tables_equal_the_formula():
    cos, sin = crystal.angular_tables(40, 3, 10)
    angles = cref.angular_angles(range(40), 3, 10)
    assert np.abs(cos - np.cos(angles)).max() < 1e-12
    assert np.abs(sin - np.sin(angles)).max() < 1e-12
    # the fastest pair turns once every 12 positions
    assert np.allclose(angles[12, 0, 0], 2 * math.pi)


def core_tables(n_ctx, H, hd):
    cos, sin = crystal.angular_tables(n_ctx, H, hd)
    return f32(cos.reshape(n_ctx, -1)), f32(sin.reshape(n_ctx, -1))


def test_angular_rotation_and_attention(rng):
    nb, T, H, hd = 2, 13, 3, 6
    C = H * hd
    qkv = rng.standard_normal((nb, T, 3 * C))
    cos, sin = core_tables(T, H, hd)
    angles = cref.angular_angles(range(T), H, hd)
    rotated = _core.layer_angular(f32(qkv), cos, sin)
    assert rel_err(rotated, cref.rotate_qk_forward(qkv, angles)) < 1e-5
    dqkv = rng.standard_normal((nb, T, 3 * C))
    assert rel_err(_core.layer_angular_backward(f32(dqkv), cos, sin),
                   cref.rotate_qk_backward(dqkv, angles)) < 1e-5
    _, att = _core.layer_attention(rotated, H)
    _, cache = ref.attention_forward(cref.rotate_qk_forward(qkv, angles), H)
    assert rel_err(att, cache[3]) < 1e-5


@FAST
@given(shift=st.integers(1, 200), T=st.integers(1, 12), H=st.integers(1, 3),
       half=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_shifting_every_position_leaves_angular_scores_unchanged(shift, T, H, half, seed):
    rng = np.random.default_rng(seed)
    C = H * 2 * half
    qkv = rng.standard_normal((1, T, 3 * C))
    shifted = np.concatenate([np.zeros((1, shift, 3 * C)), qkv], axis=1)
    cos, sin = core_tables(T + shift, H, 2 * half)

    def scores(rotated, f=lambda a: a):  # (H, T, T) q . k of every pair of the last T positions
        q, k = (f(rotated[0, -T:, i * C:(i + 1) * C].reshape(T, H, -1)) for i in (0, 1))
        return np.einsum("thd,shd->hts", q.astype(np.float64), k.astype(np.float64))

    # rounding is relative to the products summed, sum |q_d k_d|, not to the score, which
    # may cancel to near 0
    rotated = _core.layer_angular(f32(qkv), cos, sin)
    base, size = scores(rotated), scores(rotated, np.abs).max()
    assert np.abs(scores(_core.layer_angular(f32(shifted), cos, sin)) - base).max() <= 1e-5 * size
    exact = [cref.rotate_qk_forward(x, cref.angular_angles(range(x.shape[1]), H, 2 * half))
             for x in (qkv, shifted)]
    assert np.abs(scores(exact[1]) - scores(exact[0])).max() \
        <= 1e-12 * scores(exact[0], np.abs).max()


# ---- section 4: Ulam spiral attention ------------------------------------------------------

def test_ulam_points():
    assert [crystal.ulam(n) for n in range(1, 11)] == [
        (0, 0), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (2, -1)]
    points = crystal.ulam_points(5000)
    assert [tuple(p) for p in points] == [cref.ulam(n) for n in range(1, 5001)]
    assert (np.abs(np.diff(points, axis=0)).sum(axis=1) == 1).all()   # consecutive: adjacent
    assert len({tuple(p) for p in points}) == 5000                     # one number per point


def dense_mask(start, keys, T):
    mask = np.zeros((T, T), dtype=bool)
    for p in range(T):
        mask[p, keys[start[p]:start[p + 1]]] = True
    return mask


@pytest.mark.parametrize("r", [1, 2, 3])
def test_ulam_neighbour_lists_are_the_mask(r):
    T = 150
    start, keys = crystal.ulam_neighbours(T, r)
    mask = cref.ulam_mask(T, r)
    assert np.array_equal(dense_mask(start, keys, T), mask)
    for p in range(T):
        assert (np.diff(keys[start[p]:start[p + 1]]) > 0).all()
        assert mask[p, p] and (p == 0 or mask[p, p - 1])
    # the prefix property: the lists of a shorter context are the first rows of a longer one
    short_start, short_keys = crystal.ulam_neighbours(40, r)
    assert np.array_equal(short_start, start[:41])
    assert np.array_equal(short_keys, keys[:start[40]])
    counts = np.diff(start)
    assert counts.max() <= (2 * r + 1) ** 2
    if r == 2:
        assert counts.max() <= 13 and 10 < counts[50:].mean() < 14


@FAST
@given(T=st.integers(1, 40), r=st.integers(1, 3), nb=st.integers(1, 3), H=st.integers(1, 3),
       hd=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_ulam_attention_equals_dense_attention_under_the_mask(T, r, nb, H, hd, seed):
    rng = np.random.default_rng(seed)
    C = H * hd
    qkv = rng.standard_normal((nb, T, 3 * C))
    dy = rng.standard_normal((nb, T, C))
    start, keys = crystal.ulam_neighbours(T, r)
    out, att = _core.layer_ulam_attention(f32(qkv), H, start, keys)
    y_ref, cache = ref.attention_forward(qkv, H, cref.ulam_mask(T, r))
    assert rel_err(out, y_ref) < 1e-5
    rows = np.repeat(np.arange(T), np.diff(start))
    assert rel_err(att, cache[3][:, :, rows, keys]) < 1e-5
    dqkv = _core.layer_ulam_attention_backward(f32(dy), f32(qkv), H, start, keys)
    assert rel_err(dqkv, ref.attention_backward(dy, cache)) < 1e-4


# ---- section 5: crystalline loss -----------------------------------------------------------

@FAST
@given(V=st.integers(1, 120), seed=st.integers(0, 2**32 - 1))
def test_q_rows_equal_the_formula_and_sum_to_one(V, seed):
    targets = np.random.default_rng(seed).integers(-1, V, (2, 7))
    q_rows, row_of = _core.crystalline_targets(targets, crystal.ulam_points(V), 2)
    distinct = sorted(set(targets[targets >= 0].tolist()))
    assert [y for y in range(V) if row_of[y] >= 0] == distinct
    for y in distinct:
        expected = cref.q_row(y, V)
        assert abs(expected.sum() - 1) < 1e-12
        assert np.abs(q_rows[row_of[y]] - expected).max() < 1e-6 * expected.max()
        assert abs(q_rows[row_of[y]].astype(np.float64).sum() - 1) < 1e-5


def test_similarity_examples():
    assert cref.similarity(7, 7) == 1.0
    # gcd(4, 6) = 2; u(4) = (0, 1), u(6) = (-1, 0)
    assert cref.similarity(4, 6) == 0.7 * 2 / 6 + 0.3 / (1 + math.sqrt(2))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7, 1.0])
def test_crystalline_loss_forward_backward(rng, alpha):
    N, V = 11, 97
    logits = rng.standard_normal((N, V)) * 4
    targets = rng.integers(0, V, N)
    targets[[3, 8]] = -1
    n = int((targets >= 0).sum())
    total, ce, dlogits = _core.layer_crystalline(f32(logits), targets.astype(np.int64),
                                                 crystal.ulam_points(V), alpha, 1.0 / n)
    loss_ref, cache = cref.crystalline_loss_forward(logits, targets, alpha)
    assert abs(total / n - loss_ref) < 1e-5 * loss_ref
    assert abs(ce / n - ref.cross_entropy_forward(logits, targets)[0]) < 1e-5 * loss_ref
    assert rel_err(dlogits, cref.crystalline_loss_backward(1.0, cache)) < 1e-5
    assert not dlogits[[3, 8]].any()
    assert np.abs(dlogits.sum(axis=1)).max() < 1e-6   # p and the target mix both sum to 1


def test_alpha_zero_is_cross_entropy(rng):
    N, V = 9, 301
    logits = f32(rng.standard_normal((N, V)) * 4)
    targets = rng.integers(-1, V, N).astype(np.int64)
    targets[0] = 5
    loss, ce, dlogits = _core.layer_crystalline(logits, targets, crystal.ulam_points(V), 0.0, 0.1)
    ce_loss, ce_dlogits = _core.layer_crossentropy(logits, targets, 0.1)
    assert loss == ce == ce_loss
    assert np.array_equal(dlogits, ce_dlogits)
    config = dict(vocab_size=V, n_ctx=8, n_embd=8, n_layer=1, n_head=2)
    idx = rng.integers(0, V, (3, 8))
    plain = Model.create(ModelConfig(**config), seed=1)
    mixed = Model.create(ModelConfig(**config, loss="crystalline", crystalline_alpha=0.0), seed=1)
    assert plain.loss_and_grads(idx, idx)[0] == mixed.loss_and_grads(idx, idx)[0]
    assert np.array_equal(plain.grad_flat, mixed.grad_flat)


# ---- the whole model -----------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("switch", SWITCHES)
def test_model_matches_reference(rng, switch, tied):
    config = ModelConfig(vocab_size=57, n_ctx=24, n_embd=24, n_layer=2, n_head=3,
                         tie_embeddings=tied, **SWITCHES[switch])
    check_against_reference(config, B=5, T=21, rng=rng, spheres=3)


@pytest.mark.parametrize("switch", SWITCHES)
def test_gradients_match_finite_differences(rng, switch):
    config = ModelConfig(vocab_size=13, n_ctx=7, n_embd=8, n_layer=2, n_head=2,
                         tie_embeddings=False, **SWITCHES[switch])
    check_finite_differences(config, rng, T=7, per_tensor=3)


def test_bitwise_identical_for_every_thread_count_with_every_switch(rng):
    model = crystalline_model(SWITCHES["all four"], n_ctx=16)
    idx, targets = rng.integers(0, 40, (9, 16)), rng.integers(-1, 40, (9, 16))
    results = []
    for threads in (1, 2, 3):
        (loss, ce), _ = model.loss_and_grads(idx, targets, spheres=5, threads=threads)
        results.append((loss, ce, model.grad_flat.copy(),
                        model.forward(idx, spheres=5, threads=threads)))
    for loss, ce, grad, logits in results[1:]:
        assert (loss, ce) == results[0][:2]
        assert np.array_equal(grad, results[0][2])
        assert np.array_equal(logits, results[0][3])


def test_crystalline_training_reports_plain_cross_entropy(rng):
    model = crystalline_model(dict(loss="crystalline", crystalline_alpha=0.5))
    idx, targets = rng.integers(0, 40, (4, 24)), rng.integers(0, 40, (4, 24))
    (loss, train_ce), _ = model.loss_and_grads(idx, targets)
    ce = ref.cross_entropy_forward(model.forward(idx).astype(np.float64), targets)[0]
    assert abs(train_ce - ce) < 1e-5 * ce and abs(loss - ce) > 1e-3
    assert abs(model.cross_entropy(idx, targets) - ce) < 1e-5 * ce
    assert model.loss(idx, targets) == (loss, train_ce)


# ---- generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("switch", ["none", *SWITCHES])
def test_each_decoder_step_equals_a_full_forward(switch):
    model = crystalline_model(SWITCHES.get(switch, GPT2_SWITCHES), n_ctx=20)
    ids = np.random.default_rng(1).integers(0, 40, 20)
    decoder = model.core.decoder(1)
    full = model.forward(ids[None, :])[0]
    for pos, token in enumerate(ids):
        step = decoder.step(int(token), pos)
        assert np.abs(step - full[pos]).max() <= 1e-5 * np.abs(full[pos]).max(), pos


@pytest.mark.parametrize("prompt_len", [1, 7, 23])
def test_greedy_generation_with_every_switch_equals_full_forward_recomputation(prompt_len):
    model = crystalline_model(SWITCHES["all four"], n_ctx=16)
    ids = list(np.random.default_rng(prompt_len).integers(0, 40, prompt_len))
    assert model.generate_ids(ids, 30, temperature=0) == greedy_by_full_forwards(model, ids, 30)


# ---- configuration and files ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(init="gaussian"), "init must be one of"), (dict(position="rope"), "position"),
    (dict(attention="sparse"), "attention"), (dict(loss="mse"), "loss must be one of"),
    (dict(ulam_radius=0), "ulam_radius"), (dict(ulam_radius=1.5), "ulam_radius"),
    (dict(crystalline_alpha=1.5), "crystalline_alpha"),
    (dict(crystalline_alpha=-0.1), "crystalline_alpha"),
    (dict(crystalline_alpha="0.1"), "crystalline_alpha"),
    (dict(position="angular", n_embd=12, n_head=4), "must be even"),
])
def test_invalid_switches(kwargs, message):
    base = dict(vocab_size=10, n_ctx=8, n_embd=16, n_layer=1, n_head=4)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **kwargs})


def test_angular_has_no_wpe():
    sizes = dict(vocab_size=10, n_ctx=8, n_embd=16, n_layer=1, n_head=4)
    config = ModelConfig(**sizes, position="angular")
    assert "wpe" not in dict(config.tensor_shapes())
    assert config.num_parameters() == \
        ModelConfig(**sizes, position="learned").num_parameters() - 8 * 16


def test_defaults_follow_the_ablation():
    config = ModelConfig(vocab_size=10, n_ctx=8, n_embd=16, n_layer=1, n_head=4)
    assert (config.init, config.position, config.attention, config.ulam_radius, config.loss,
            config.crystalline_alpha) == ("normal", "angular", "ulam", 2, "ce", 0.1)


def test_an_older_configuration_is_gpt2():
    """A configuration saved before the switches existed keeps meaning what it meant."""
    old = dict(vocab_size=10, n_ctx=8, n_embd=16, n_layer=1, n_head=4, n_inner=64,
               tie_embeddings=True)
    config = ModelConfig.from_dict(old)
    assert {name: getattr(config, name) for name in GPT2_SWITCHES} == GPT2_SWITCHES
    assert "wpe" in dict(config.tensor_shapes())


def test_a_file_saved_before_the_switches_loads_as_gpt2(tmp_path):
    model = crystalline_model(GPT2_SWITCHES)
    old_config = {k: v for k, v in model.config.to_dict().items()
                  if k not in (*GPT2_SWITCHES, "ulam_radius", "crystalline_alpha")}
    metadata = {"format": "cllm", "format_version": "1", "config": json.dumps(old_config)}
    (tmp_path / "old.cllm").write_bytes(safetensors.numpy.save(dict(model.params),
                                                               metadata=metadata))
    loaded = Model.load(tmp_path / "old.cllm")
    assert loaded.config == model.config
    ids = np.arange(12)[None, :] % 40
    assert np.array_equal(loaded.forward(ids), model.forward(ids))


def test_switches_survive_save_and_load(tmp_path):
    model = crystalline_model({**SWITCHES["all four"], "ulam_radius": 3,
                               "crystalline_alpha": 0.25}, n_ctx=16)
    assert ModelConfig.from_dict(json.loads(model.config.to_json())) == model.config
    model.save(tmp_path / "m.cllm")
    loaded = Model.load(tmp_path / "m.cllm")
    assert loaded.config == model.config
    assert loaded.generate_ids([1, 2, 3], 12, temperature=0) == \
        model.generate_ids([1, 2, 3], 12, temperature=0)
