"""Incremental generation against full forwards; prompts read as blocks; batches; bf16 and int8
weights against the float64 reference; sampling; save and load."""
import numpy as np
import pytest
from tokenizers import Tokenizer

import reference as ref
from cllm import Model, ModelConfig
from cllm.config import GPT2_SWITCHES
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


# ---- prompts read as blocks of rows, batches, quantized weights ---------------------------

def bf16_rounded(w):
    """float64 of the bfloat16 nearest to float32(w), ties to even: written from the format's
    definition (keep the top 16 bits of the float32, rounding on the 16 dropped)."""
    bits = np.asarray(w, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def q8_dequantized(w_rows):
    """Rows (OC, IC) quantized in blocks of 32 along IC to int8 with scale amax/127, back in
    float64."""
    w = np.asarray(w_rows, np.float64)
    OC, IC = w.shape
    K = -(-IC // 32) * 32
    padded = np.zeros((OC, K))
    padded[:, :IC] = w
    blocks = padded.reshape(OC, K // 32, 32)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / 127
    q = np.divide(blocks, scale, out=np.zeros_like(blocks), where=scale > 0)
    return (np.clip(np.round(q), -127, 127) * scale).reshape(OC, K)[:, :IC]


def reference_with(model, rows_fn):
    """float64 params of model with every generation matrix replaced by rows_fn applied to it
    rows by output (layer matrices (IC, OC) are transposed there and back)."""
    from cllm._core import DECODER_MATRICES
    params = {name: np.asarray(v, np.float64) for name, v in model.params.items()}
    for name in list(params):
        if any(name.endswith(m) for m in DECODER_MATRICES):
            params[name] = rows_fn(params[name].T).T
        elif name in ("wte", "lm_head.weight"):
            params[name] = rows_fn(params[name])
    return params


@pytest.mark.parametrize("tied", [True, False])
def test_a_prompt_read_as_one_block_equals_its_steps(tied):
    model = random_model(tied, n_ctx=16)
    ids = np.random.default_rng(2).integers(0, 40, 16)
    steps = model.core.decoder(2)
    by_step = np.stack([steps.step(int(t), pos).copy() for pos, t in enumerate(ids)])
    block = model.core.decoder(2).read(ids, every=True)
    assert np.abs(block - by_step).max() <= 1e-5 * np.abs(by_step).max()
    last = model.core.decoder(2).read(ids)
    assert np.abs(last - by_step[-1]).max() <= 1e-5 * np.abs(by_step[-1]).max()


@pytest.mark.parametrize("weights", ["float32", "bf16", "int8"])
def test_a_batch_decodes_like_each_prompt_alone(weights):
    base = random_model(n_ctx=16)
    model = base if weights == "float32" else base.quantized(weights)
    prompts = [[1, 2, 3], [7] * 9, [5, 30, 2, 9, 11], list(range(20))]  # the last slides
    together = model.generate_ids(prompts, 30, temperature=0)
    alone = [model.generate_ids(p, 30, temperature=0) for p in prompts]
    assert together == alone
    sampled = model.generate_ids(prompts, 20, temperature=1.0, seed=4)
    assert sampled[0] == model.generate_ids(prompts[0], 20, temperature=1.0, seed=4)
    assert sampled[1] == model.generate_ids(prompts[1], 20, temperature=1.0, seed=5)


@pytest.mark.parametrize("weights", ["float32", "bf16", "int8"])
def test_a_batch_step_has_the_bits_of_each_row_alone(weights):
    """Nine sequences decoded together (a tile of eight rows and one more) give, bitwise, the
    logits each gives decoded alone, on any thread count. Widths that are no multiple of 4
    or 8 (embedding 20, 37 tokens) exercise the kernels' tails."""
    config = ModelConfig(vocab_size=37, n_ctx=12, n_embd=20, n_layer=2, n_head=2,
                         tie_embeddings=False)
    model = Model.create(config, seed=3)
    rng = np.random.default_rng(3)
    for view in model.params.values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    if weights != "float32":
        model = model.quantized(weights)
    tokens = rng.integers(0, 37, (9, 6))
    alone = []
    for seq in tokens:
        decoder = model.core.decoder(1)
        alone.append(np.stack([decoder.step(int(t), pos).copy() for pos, t in enumerate(seq)]))
    for threads in (1, 3):
        decoder = model.core.decoder(threads, 9)
        together = np.stack([decoder.decode(tokens[:, pos], [pos] * 9).copy()
                             for pos in range(6)], axis=1)
        for seq in range(9):
            np.testing.assert_array_equal(together[seq], alone[seq])


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_quantized_decoder_is_bitwise_the_same_for_any_threads(weights):
    """And a prompt read as one block (weights in float32 tiles through BLAS) agrees with its
    steps (one row: the bf16 and int8 kernels) to float32 rounding."""
    model = random_model(tied=False).quantized(weights)
    ids = np.random.default_rng(4).integers(0, 40, 16)
    blocks = [model.core.decoder(threads).read(ids, every=True) for threads in (1, 2, 3)]
    steps = []
    for threads in (1, 2, 3):
        decoder = model.core.decoder(threads)
        steps.append(np.stack([decoder.step(int(t), pos).copy() for pos, t in enumerate(ids)]))
    for run in blocks[1:]:
        assert np.array_equal(run, blocks[0])
    for run in steps[1:]:
        assert np.array_equal(run, steps[0])
    assert np.abs(blocks[0] - steps[0]).max() <= 1e-5 * np.abs(steps[0]).max()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("switches", [GPT2_SWITCHES, dict(position="angular", attention="ulam")])
def test_bf16_model_against_the_reference_with_bf16_weights(tied, switches):
    config = ModelConfig(vocab_size=40, n_ctx=16, n_embd=24, n_layer=2, n_head=3,
                         tie_embeddings=tied, **switches)
    model = Model.create(config, seed=1)
    rng = np.random.default_rng(1)
    for view in model.params.values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    idx = rng.integers(0, 40, (2, 16))
    expected = ref.gpt2_forward(reference_with(model, bf16_rounded), config, idx)
    got = model.quantized("bf16").forward(idx)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_int8_model_against_the_reference_with_int8_weights():
    """Activations are quantized too (blocks of 32 per row): agreement to about 1%."""
    model = random_model(tied=False)
    idx = np.random.default_rng(5).integers(0, 40, (2, 16))
    expected = ref.gpt2_forward(reference_with(model, q8_dequantized), model.config, idx)
    got = model.quantized("int8").forward(idx)
    assert np.abs(got - expected).max() <= 3e-2 * np.abs(expected).max()
    exact = model.forward(idx)
    assert np.abs(exact - expected).max() > 1e-4 * np.abs(expected).max()  # int8 is not float32


@pytest.mark.parametrize("loss", ["ce", "crystalline"])
def test_quantized_losses_follow_float32_and_training_is_refused(loss):
    config = ModelConfig(vocab_size=40, n_ctx=16, n_embd=24, n_layer=2, n_head=3, loss=loss)
    model = Model.create(config, seed=2)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 40, (3, 16)), rng.integers(-1, 40, (3, 16))
    exact = model.loss(idx, targets)
    for weights, tolerance in (("bf16", 1e-3), ("int8", 1e-2)):
        quantized = model.quantized(weights)
        assert quantized.weight_format == weights
        got = quantized.loss(idx, targets)
        assert abs(got.loss - exact.loss) <= tolerance * exact.loss
        assert abs(got.ce - exact.ce) <= tolerance * exact.ce
        assert quantized.cross_entropy(idx, targets) == got.ce
        with pytest.raises(ValueError, match="for generation only"):
            quantized.loss_and_grads(idx, targets)
        with pytest.raises(ValueError, match="already quantized"):
            quantized.quantized("int8")


def test_text_of_several_prompts_at_once():
    model = char_model()
    texts = model.generate(["hello", "there", "wor"], 12, temperature=1.0, seed=3)
    assert texts[0] == model.generate("hello", 12, temperature=1.0, seed=3)
    assert texts[2] == model.generate("wor", 12, temperature=1.0, seed=5)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(["hello", ""])


def test_more_prompts_than_one_batch_keep_their_seeds():
    from cllm.model import MAX_BATCH
    model = random_model()
    prompts = [[i % 40, (3 * i) % 40] for i in range(MAX_BATCH + 3)]
    together = model.generate_ids(prompts, 6, temperature=1.0, seed=7)
    assert len(together) == len(prompts)
    for i in (0, MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 2):
        assert together[i] == model.generate_ids(prompts[i], 6, temperature=1.0, seed=7 + i)


def test_step_threads_follow_the_faster_count():
    """A decoder whose step time depends on its threads (on a clock of the test's own), as when
    another process takes cores: the probe moves to the faster count, and back when the other
    process ends."""
    from cllm.generate import StepThreads

    class Decoder:
        most_threads = 4
        threads = 4
    decoder, now = Decoder(), [0.0]
    seconds = {4: 20.0, 3: 1.0, 2: 4.0, 1: 6.0}

    def step():
        now[0] += seconds[decoder.threads]
    choice = StepThreads(decoder, clock=lambda: now[0])
    for _ in range(70):
        choice.run(step)
    assert choice.chosen == 3
    seconds[4] = 0.2
    for _ in range(200):
        choice.run(step)
    assert choice.chosen == 4
    seconds[4] = 20.0         # a core taken again: moved off within a few steps
    for _ in range(5):
        choice.run(step)
    assert choice.chosen == 3
