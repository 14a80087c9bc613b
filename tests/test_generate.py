"""Incremental generation against full forwards; sampling; save and load."""
import numpy as np
import pytest
from tokenizers import Tokenizer

from cllm import Model, ModelConfig
from cllm.generate import sample
from cllm.tokenizer import train_char


def random_model(tied=True, n_ctx=16, seed=0, vocab_size=40):
    config = ModelConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_embd=24, n_layer=2, n_head=3,
                         tie_embeddings=tied)
    model = Model.create(config, seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.params.values():  # larger weights than the init: sharper distributions
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_each_decoder_step_equals_a_full_forward(tied, threads):
    model = random_model(tied)
    ids = np.random.default_rng(1).integers(0, 40, 16)
    decoder = model.core.decoder(threads)
    full = model.forward(ids[None, :])[0]
    for pos, token in enumerate(ids):
        step = decoder.step(int(token), pos)
        assert np.abs(step - full[pos]).max() <= 1e-5 * np.abs(full[pos]).max()


def greedy_by_full_forwards(model, ids, n):
    """Greedy continuation recomputing a full forward over the window for every token."""
    n_ctx = model.config.n_ctx
    window, out = list(ids[-n_ctx:]), []
    for _ in range(n):
        token = int(np.argmax(model.forward(np.array([window]))[0, -1]))
        out.append(token)
        if len(window) == n_ctx:
            window = window[n_ctx - n_ctx // 2:]
        window.append(token)
    return out


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 23])
def test_greedy_generation_equals_full_forward_recomputation(prompt_len):
    """Also past the context: prompts longer than n_ctx and generation that slides the window."""
    model = random_model(n_ctx=16)
    ids = list(np.random.default_rng(prompt_len).integers(0, 40, prompt_len))
    assert model.generate_ids(ids, 40, temperature=0) == greedy_by_full_forwards(model, ids, 40)


def test_sampling_is_reproducible_and_respects_top_k_top_p():
    model = random_model()
    a = model.generate_ids([1, 2, 3], 30, temperature=1.0, seed=5)
    assert a == model.generate_ids([1, 2, 3], 30, temperature=1.0, seed=5)
    assert a != model.generate_ids([1, 2, 3], 30, temperature=1.0, seed=6)
    greedy = model.generate_ids([1, 2, 3], 30, temperature=0)
    assert model.generate_ids([1, 2, 3], 30, temperature=1.0, top_k=1, seed=1) == greedy
    assert model.generate_ids([1, 2, 3], 30, temperature=1.0, top_p=1e-9, seed=1) == greedy
    assert model.generate_ids([1, 2, 3], 0) == []


def test_sample_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.bincount([sample(logits, rng, 1.0, None, None) for _ in range(4000)], minlength=4)
    assert np.abs(draws / 4000 - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    assert set(sample(logits, rng, 1.0, 2, None) for _ in range(300)) == {0, 1}
    assert set(sample(logits, rng, 1.0, None, 0.7) for _ in range(300)) == {0, 1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(threads=0), "threads"),
])
def test_bad_generation_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_model().generate_ids([1], **kwargs)


def test_bad_prompts():
    model = random_model()
    with pytest.raises(ValueError, match="empty"):
        model.generate_ids([])
    with pytest.raises(ValueError, match="lie in"):
        model.generate_ids([40])
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello")


def char_model(text="hello world, hello there\n"):
    tokenizer = train_char([text])
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_ctx=32, n_embd=16, n_layer=1,
                         n_head=2)
    return Model.create(config, seed=3, tokenizer=tokenizer)


def test_text_generation_and_streaming():
    model = char_model()
    text = model.generate("hello", 20, temperature=1.0, seed=2)
    assert len(text) == 20 and set(text) <= set("hello world, hello there\n")
    assert "".join(model.stream("hello", 20, temperature=1.0, seed=2)) == text
    with pytest.raises(ValueError, match="empty"):
        model.generate("")


def test_save_and_load_round_trip(tmp_path):
    model = char_model()
    model.params["ln_f.bias"][...] = 0.25
    path = tmp_path / "m.cllm"
    model.save(path)
    loaded = Model.load(path)
    assert loaded.config == model.config
    assert np.array_equal(loaded.flat, model.flat)
    assert not loaded.flat.flags.writeable  # the mapped file itself, not a copy
    assert isinstance(loaded.tokenizer, Tokenizer)
    assert loaded.generate("hel", 10, seed=1) == model.generate("hel", 10, seed=1)
    writable = Model.load(path, writable=True)
    writable.params["wte"][0, 0] = 1.0
    assert Model.load(path).params["wte"][0, 0] == model.params["wte"][0, 0]


def test_decoder_is_bitwise_identical_for_every_thread_count():
    model = random_model(tied=False)
    ids = np.random.default_rng(4).integers(0, 40, 16)
    runs = []
    for threads in (1, 2, 3, 4):
        decoder = model.core.decoder(threads)
        runs.append(np.stack([decoder.step(int(t), pos).copy() for pos, t in enumerate(ids)]))
    for run in runs[1:]:
        assert np.array_equal(run, runs[0])
