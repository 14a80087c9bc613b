"""Weights quantized for generation: the tensors of each format, the core's quantizers against
NumPy references, .cllm files of quantized weights (and hostile ones), and the commands that
make and refuse them."""
import json
import math
import os
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors import safe_open

from cli_helpers import assert_clean_error, run_cli, write_corpus
from cllm import _core
from cllm.checkpoint import load_cllm, load_float32_cllm, save_cllm
from cllm.config import ModelConfig
from cllm.errors import CheckpointError, NonFiniteError
from cllm.interop.tensorfile import TensorFile, write_safetensors
from cllm.model import Model
from cllm.quantize import decoder_matrices, quantize_tensors, quantized_tensor_specs
from cllm.resume import load_checkpoint
from cllm.tokenizer import tokenizer_to_json, train_char
from test_hardening import DATA_MISMATCH, parts, rewrite

# Tied with angular positions and widths that fill whole blocks of 32; untied with a learned
# table and widths that do not (40 and 24 weights per row: padded to 64 and 32).
CONFIGS = {
    "tied angular": ModelConfig(vocab_size=37, n_ctx=8, n_embd=64, n_layer=2, n_head=2,
                                position="angular", attention="dense"),
    "untied learned": ModelConfig(vocab_size=37, n_ctx=8, n_embd=40, n_layer=1, n_head=2,
                                  n_inner=24, tie_embeddings=False, position="learned"),
}
QUANTIZED = ("bf16", "int8")
BLOCK = 32
# The layer matrices generation reads, in the order of Transformer.use_weights.
LAYER_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
TOKENIZER = train_char(["the quick brown fox jumps over a lazy dog\n"])


def float_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random parameters at several scales, with a row of zeros in the token table (a block
    whose scale is 0)."""
    rng = np.random.default_rng(seed)
    params = {name: (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 2)).astype(np.float32)
              for name, shape in config.tensor_shapes()}
    params["wte"][3] = 0
    return params


def expected_specs(config: ModelConfig, weights: str) -> list:
    """The tensors of a file of `weights`: float32 ones as they are; quantized, every matrix
    (a 2-D tensor other than the position table) stored rows by output, the layers'
    transposed from their (IC, OC) layout."""
    specs = []
    for name, shape in config.tensor_shapes():
        if weights == "float32" or len(shape) != 2 or name == "wpe":
            specs.append((name, ("F32", shape)))
            continue
        OC, IC = shape[::-1] if name.startswith("h.") else shape
        if weights == "bf16":
            specs.append((f"{name}.bf16", ("BF16", (OC, IC))))
        else:
            K = math.ceil(IC / BLOCK) * BLOCK
            specs += [(f"{name}.q8", ("I8", (OC, K))),
                      (f"{name}.q8_scale", ("F32", (OC, K // BLOCK)))]
    return specs


def reference_q8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks: each row zero-padded to a multiple of 32, each block of 32 scaled by its
    largest magnitude / 127 and rounded to the nearest integer."""
    OC, IC = rows.shape
    K = math.ceil(IC / BLOCK) * BLOCK
    padded = np.zeros((OC, K), np.float32)
    padded[:, :IC] = rows
    blocks = padded.reshape(OC, K // BLOCK, BLOCK)
    scale = (np.abs(blocks).max(axis=2) / np.float32(127)).astype(np.float32)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.round(blocks * inverse[..., None]).astype(np.int8)
    return q.reshape(OC, K), scale


def reference_bf16(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of each float32, rounded to the nearest, ties to the even one."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def rows_by_output(name: str, matrix: np.ndarray) -> np.ndarray:
    return matrix.T if name.startswith("h.") else matrix


# ---- the tensors of each format ----------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
@pytest.mark.parametrize("weights", ["float32", *QUANTIZED])
def test_specs(config, weights):
    specs = quantized_tensor_specs(config, weights)
    assert list(specs.items()) == expected_specs(config, weights)
    assert ("lm_head.weight" in str(list(specs))) is not config.tie_embeddings
    assert ("wpe" in specs) is (config.position == "learned")


def test_unknown_format_is_refused():
    config = CONFIGS["tied angular"]
    for call in (lambda: quantized_tensor_specs(config, "int4"),
                 lambda: quantize_tensors(config, float_params(config), "f16"),
                 lambda: decoder_matrices(config, {}, "float32")):
        with pytest.raises(ValueError, match="quantized weights are bf16 or int8"):
            call()


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
@pytest.mark.parametrize("weights", QUANTIZED)
def test_quantize_tensors_against_references(config, weights):
    params = float_params(config)
    tensors = quantize_tensors(config, params, weights)
    assert [(name, (array.dtype, array.shape)) for name, array in tensors.items()] == [
        (name, ({"F32": np.float32, "I8": np.int8, "BF16": np.uint16}[dtype], shape))
        for name, (dtype, shape) in expected_specs(config, weights)]
    for name, shape in config.tensor_shapes():
        if name in tensors:
            assert np.array_equal(tensors[name], params[name]), name
            continue
        rows = rows_by_output(name, params[name])
        if weights == "bf16":
            assert np.array_equal(tensors[f"{name}.bf16"], reference_bf16(rows)), name
            continue
        q, scale = tensors[f"{name}.q8"], tensors[f"{name}.q8_scale"]
        expected_q, expected_scale = reference_q8(rows)
        assert np.array_equal(scale, expected_scale), name
        assert np.array_equal(q, expected_q), name
        # what generation computes from them: each weight within half a step of its own
        restored = (q.reshape(*scale.shape, BLOCK) * scale[..., None]).reshape(q.shape)
        assert np.all(np.abs(restored[:, :rows.shape[1]] - rows) <= scale.repeat(BLOCK, 1)[
            :, :rows.shape[1]] * 0.5001)
        assert not q[:, rows.shape[1]:].any()
    if weights == "int8":
        assert not tensors["wte.q8"][3].any() and not tensors["wte.q8_scale"][3].any()


def test_bf16_rounds_to_nearest_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF818000, 0x7F7FFFFF],
                    dtype=np.uint32)
    rounded = _core.bf16_round(bits.view(np.float32))
    assert rounded.dtype == np.uint16
    assert rounded.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F80]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
@pytest.mark.parametrize("weights", QUANTIZED)
def test_decoder_matrices(config, weights):
    tensors = quantize_tensors(config, float_params(config), weights)

    def matrix(name):
        if weights == "bf16":
            return (tensors[f"{name}.bf16"],)
        return tensors[f"{name}.q8"], tensors[f"{name}.q8_scale"]

    head = "wte" if config.tie_embeddings else "lm_head.weight"
    expected = [matrix(f"h.{layer}.{name}") for layer in range(config.n_layer)
                for name in LAYER_MATRICES] + [matrix(head), matrix("wte")]
    matrices = decoder_matrices(config, tensors, weights)
    assert len(matrices) == 4 * config.n_layer + 2
    for got, want in zip(matrices, expected):
        got = (got,) if weights == "bf16" else got
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))


# ---- files ---------------------------------------------------------------------------------

def test_safetensors_writer_takes_bf16_bits_when_told(tmp_path):
    bits = reference_bf16(np.array([[1.5, -2.0], [3.0e38, 1e-3]], np.float32))
    write_safetensors(tmp_path / "t.safetensors",
                      [("w", bits, "BF16"), ("q", np.arange(-3, 3, dtype=np.int8))])
    f = TensorFile(tmp_path / "t.safetensors")
    assert (f.entries["w"].dtype, f.entries["q"].dtype) == ("BF16", "I8")
    assert np.array_equal(f.float32("w"), (bits.astype(np.uint32) << 16).view(np.float32))
    for tensors, message in [([("w", bits)], "dtype uint16 cannot be written"),
                             ([("w", bits.astype(np.float32), "BF16")],
                              "dtype float32 cannot be written as BF16")]:
        with pytest.raises(ValueError, match=message):
            write_safetensors(tmp_path / "u.safetensors", tensors)


def quantized_file(path, config, weights, tokenizer_json=None):
    save_cllm(path, quantize_tensors(config, float_params(config), weights), config,
              tokenizer_json, weights=weights)
    return path


@pytest.mark.parametrize("use_mmap", [True, False])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
@pytest.mark.parametrize("weights", QUANTIZED)
def test_round_trip(tmp_path, config, weights, use_mmap):
    tensors = quantize_tensors(config, float_params(config), weights)
    save_cllm(tmp_path / "q.cllm", tensors, config, '{"model": {}}', weights=weights)
    loaded = load_cllm(tmp_path / "q.cllm", mmap=use_mmap)
    assert loaded.weights == weights and loaded.config == config
    assert loaded.tokenizer_json == '{"model": {}}'
    assert loaded.flat is None and loaded.optimizer is None and loaded.training is None
    assert list(loaded.params) == list(tensors)
    for name, array in tensors.items():
        assert loaded.params[name].dtype == array.dtype and loaded.params[name].shape == array.shape
        assert loaded.params[name].tobytes() == array.tobytes(), name
    with safe_open(tmp_path / "q.cllm", framework="numpy") as f:
        assert f.metadata()["weights"] == weights
    float_file = tmp_path / "f.cllm"
    save_cllm(float_file, float_params(config), config, None)
    assert load_cllm(float_file).weights == "float32"
    assert "weights" not in parts(float_file)[0]["__metadata__"]


def test_save_refuses_what_a_quantized_file_cannot_hold(tmp_path):
    config = CONFIGS["untied learned"]
    tensors = quantize_tensors(config, float_params(config), "int8")
    with pytest.raises(ValueError, match="holds no optimizer or training state"):
        save_cllm(tmp_path / "q.cllm", tensors, config, None, training={"step": 1},
                  weights="int8")
    with pytest.raises(ValueError, match="tensor wte.q8: I8 tensors are given as int8, not "
                                         "float32"):
        save_cllm(tmp_path / "q.cllm", {**tensors, "wte.q8": tensors["wte.q8"].astype(np.float32)}, config,
                  None, weights="int8")
    with pytest.raises(CheckpointError, match="tensor wte.q8_scale is missing"):
        save_cllm(tmp_path / "q.cllm", {k: v for k, v in tensors.items() if k != "wte.q8_scale"},
                  config, None, weights="int8")
    nan_scale = tensors["h.0.mlp.c_fc.weight.q8_scale"].copy()
    nan_scale[1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="h.0.mlp.c_fc.weight.q8_scale holds values that "
                                             "are not finite"):
        save_cllm(tmp_path / "q.cllm", {**tensors, "h.0.mlp.c_fc.weight.q8_scale": nan_scale},
                  config, None, weights="int8")
    bf16 = quantize_tensors(config, float_params(config), "bf16")
    infinite = bf16["lm_head.weight.bf16"].copy()
    infinite[0, 0] = 0xFF80   # -inf
    with pytest.raises(NonFiniteError, match="lm_head.weight.bf16 holds values that are not"):
        save_cllm(tmp_path / "q.cllm", {**bf16, "lm_head.weight.bf16": infinite}, config, None,
                  weights="bf16")
    assert os.listdir(tmp_path) == []


# Hostile files: edits of a sealed int8 or bf16 file of the untied configuration.

def _set_entry(tensor, **fields):
    def change(header, data):
        header[tensor].update(fields)
    return change


def _add_entry(tensor):
    def change(header, data):
        header[tensor] = {"dtype": "F32", "shape": [0], "data_offsets": [len(data)] * 2}
    return change


def _without(tensor):
    def change(header, data):
        begin, end = header.pop(tensor)["data_offsets"]
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][0] >= end:
                info["data_offsets"] = [offset - (end - begin) for offset in info["data_offsets"]]
        return data[:begin] + data[end:]
    return change


def _value(tensor, packed: bytes, at: int = 5):
    def change(header, data):
        begin = header[tensor]["data_offsets"][0] + at * len(packed)
        return data[:begin] + packed + data[begin + len(packed):]
    return change


def _metadata(**entries):
    def change(header, data):
        for key, value in entries.items():
            if value is None:
                del header["__metadata__"][key]
            else:
                header["__metadata__"][key] = value
    return change


SCALE = "h.0.attn.c_proj.weight.q8_scale"
NOT_FINITE_SCALES = f"tensor {SCALE} holds int8 scales that are negative or not finite"
NOT_FINITE_BF16 = "tensor wte.bf16 holds bf16 values that are not finite, NaN or infinity"


@pytest.mark.parametrize("weights, change, sealed, message", [
    ("int8", _set_entry("wte.q8", dtype="U8"), True,
     "tensor wte.q8 has dtype 'U8' but a .cllm file of int8 weights holds it as I8"),
    ("bf16", _set_entry("wte.bf16", dtype="F16"), True,
     "tensor wte.bf16 has dtype 'F16' but a .cllm file of bf16 weights holds it as BF16"),
    ("int8", _set_entry(SCALE, dtype="I8"), True, "holds it as F32"),
    ("int8", _set_entry("h.0.mlp.c_proj.weight.q8", shape=[32, 40]), True,
     "tensor h.0.mlp.c_proj.weight.q8 has shape (32, 40) but the configuration needs (40, 32)"),
    ("bf16", _set_entry("lm_head.weight.bf16", shape=[40, 37]), True,
     "tensor lm_head.weight.bf16 has shape (40, 37) but the configuration needs (37, 40)"),
    ("int8", _without("lm_head.weight.q8_scale"), True,
     "tensor lm_head.weight.q8_scale is missing"),
    ("bf16", _without("h.0.attn.c_attn.weight.bf16"), True,
     "tensor h.0.attn.c_attn.weight.bf16 is missing"),
    ("int8", _add_entry("h.0.attn.c_attn.weight"), True,
     "unexpected tensor h.0.attn.c_attn.weight (not part of the model configuration)"),
    ("int8", _add_entry("optim.m.wte"), True,
     "damaged .cllm file (a file of int8 weights, which is for generation, holds the "
     "optimizer tensor optim.m.wte)"),
    ("bf16", _metadata(training=json.dumps({"step": 3})), True,
     "damaged .cllm file (a file of bf16 weights, which is for generation, holds a training "
     "state)"),
    ("int8", _metadata(weights="int4"), True,
     "unknown weight format 'int4' (cllm reads float32, bf16, int8)"),
    ("int8", _metadata(weights="bf16"), True, "unexpected tensor wte.q8"),
    ("bf16", _metadata(weights=None), True, "unexpected tensor wte.bf16"),
    ("int8", _value(SCALE, struct.pack("<f", float("nan"))), True, NOT_FINITE_SCALES),
    ("int8", _value(SCALE, struct.pack("<f", float("inf"))), True, NOT_FINITE_SCALES),
    ("int8", _value(SCALE, struct.pack("<f", -0.5)), True, NOT_FINITE_SCALES),
    ("bf16", _value("wte.bf16", struct.pack("<H", 0x7FC0)), True, NOT_FINITE_BF16),
    ("bf16", _value("wte.bf16", struct.pack("<H", 0xFF80), at=200), True, NOT_FINITE_BF16),
    ("int8", _value("wte.q8", b"\x7f"), False, DATA_MISMATCH),
    ("bf16", _metadata(weights="int8"), False, "unexpected tensor wte.bf16"),
], ids=["int8 as U8", "bf16 as F16", "scale as I8", "q8 transposed", "bf16 transposed",
        "scale missing", "bf16 missing", "float matrix extra", "optimizer tensor",
        "training state", "int4", "int8 called bf16", "bf16 called float32", "NaN scale",
        "infinite scale", "negative scale", "NaN bf16", "-inf bf16", "q8 edited",
        "bf16 called int8 unsealed"])
def test_hostile_quantized_files(tmp_path, weights, change, sealed, message):
    path = rewrite(quantized_file(tmp_path / "q.cllm", CONFIGS["untied learned"], weights),
                   change, sealed)
    with pytest.raises(CheckpointError) as info:
        load_cllm(path)
    assert str(info.value).startswith(f"{path}") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("weights", QUANTIZED)
def test_truncated_quantized_file(tmp_path, weights):
    data = quantized_file(tmp_path / "q.cllm", CONFIGS["untied learned"], weights).read_bytes()
    cut = tmp_path / "cut.cllm"
    for length in sorted({*range(0, 200, 13), *range(200, len(data), len(data) // 37)}):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=r"cut\.cllm: truncated"):
            load_cllm(cut)


def test_training_refuses_quantized_files(tmp_path):
    path = quantized_file(tmp_path / "checkpoint_step_3.cllm", CONFIGS["tied angular"], "int8",
                          tokenizer_to_json(TOKENIZER))
    message = (f"{path} holds int8 weights: a quantized model is for generation; train from "
               f"the float32 model it came from")
    for load in (lambda: load_float32_cllm(path, "train from"), lambda: load_checkpoint(path)):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            load()


# ---- the commands ----------------------------------------------------------------------------

PROMPTS = ["the fox", "a lazy dog", "over"]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    config = ModelConfig(vocab_size=TOKENIZER.get_vocab_size(), n_ctx=32, n_embd=64, n_layer=2,
                         n_head=2, n_inner=128)
    path = tmp_path_factory.mktemp("float") / "model.cllm"
    Model.create(config, seed=5, tokenizer=TOKENIZER).save(path)
    return path


@pytest.fixture(scope="module")
def quantized_models(float_model, tmp_path_factory):
    """`cllm quantize` of float_model to each format: format -> (path, what it printed)."""
    import contextlib
    import io
    from cllm.cli import main
    folder = tmp_path_factory.mktemp("quantized")
    made = {}
    for weights in QUANTIZED:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["quantize", "-m", str(float_model), "-o", str(folder / f"{weights}.cllm"),
                         "--to", weights]) == 0
        made[weights] = (folder / f"{weights}.cllm", out.getvalue())
    return made


@pytest.mark.parametrize("weights", QUANTIZED)
def test_quantize_then_infer(weights, float_model, quantized_models, capsys):
    path, printed = quantized_models[weights]
    size, float_size = path.stat().st_size / 1e6, float_model.stat().st_size / 1e6
    assert printed == (f"wrote {path}: {weights} weights, {size:.2f} MB (the float32 "
                       f"{float_model}: {float_size:.2f} MB)\n"
                       f"generate with: cllm infer -m {path} -p \"Once upon a time\"\n")
    # the matrices hold nearly all the weights: a quarter or half of the float32 size
    assert path.stat().st_size < float_model.stat().st_size * (0.35 if weights == "int8" else 0.6)
    f = load_cllm(path)
    assert f.weights == weights and f.tokenizer_json == tokenizer_to_json(TOKENIZER)
    source = Model.load(float_model)
    expected = quantize_tensors(source.config, source.params, weights)
    assert all(np.array_equal(f.params[name], array) for name, array in expected.items())
    code, out, err = run_cli(capsys, "infer", "-m", path, "-p", "the fox", "-n", 12, "--seed", 3,
                             "--threads", 1)
    assert code == 0, err
    assert out.startswith("the fox") and len(out) == len("the fox") + 12 + 1
    assert out == "the fox" + Model.load(path).generate("the fox", max_new_tokens=12, seed=3,
                                                        threads=1) + "\n"


@pytest.mark.parametrize("model", ["float", "int8"])
def test_prompts_file(model, float_model, quantized_models, tmp_path, capsys):
    path = float_model if model == "float" else quantized_models[model][0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\r\n   \n{PROMPTS[2]}")
    code, out, err = run_cli(capsys, "infer", "-m", path, "--prompts", prompts, "-n", 6,
                             "--seed", 2, "--threads", 1, "-o", tmp_path / "out.txt")
    assert code == 0, err
    texts = Model.load(path).generate(PROMPTS, max_new_tokens=6, seed=2, threads=1)
    assert out == "".join(f"--- prompt {i} ---\n{prompt}{text}\n"
                          for i, (prompt, text) in enumerate(zip(PROMPTS, texts), 1))
    assert (tmp_path / "out.txt").read_text() == out
    assert [len(text) for text in texts] == [6] * 3


def test_refusals(float_model, quantized_models, tmp_path, capsys):
    int8 = quantized_models["int8"][0]
    code, _, err = run_cli(capsys, "quantize", "-m", int8, "-o", tmp_path / "again.cllm",
                           "--to", "bf16")
    assert assert_clean_error(code, err, 1) == (
        f"error: {int8} holds int8 weights: a quantized model is for generation; quantize the "
        f"float32 model it came from")
    os.symlink(float_model, tmp_path / "link.cllm")
    for output in (float_model, tmp_path / "link.cllm"):
        before = float_model.read_bytes()
        code, _, err = run_cli(capsys, "quantize", "-m", float_model, "-o", output, "--to", "int8")
        assert "is the model itself: write the quantized model to another file" in \
            assert_clean_error(code, err, 1)
        assert float_model.read_bytes() == before
    code, _, err = run_cli(capsys, "quantize", "-m", float_model, "-o", tmp_path / "q.cllm")
    assert "the following arguments are required: --to" in assert_clean_error(code, err, 2)
    code, _, err = run_cli(capsys, "export", "-m", int8, "--to", "gguf", tmp_path / "m.gguf")
    assert "holds int8 weights: a quantized model is for generation; export the float32" in \
        assert_clean_error(code, err, 1)


def test_training_from_a_quantized_model_is_refused(quantized_models, tmp_path, capsys):
    int8 = quantized_models["int8"][0]
    corpus = write_corpus(tmp_path / "corpus", files=1, lines=5)
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path / "run", "--init-from",
                           int8, "--max-steps", 1)
    assert assert_clean_error(code, err, 1) == (
        f"error: {int8} holds int8 weights: a quantized model is for generation; train from "
        f"the float32 model it came from")
    (tmp_path / "resumed").mkdir()
    shutil.copy(int8, tmp_path / "resumed" / "checkpoint_step_4.cllm")
    code, _, err = run_cli(capsys, "train", "-d", corpus, "-c", tmp_path / "resumed", "--resume")
    assert "holds int8 weights: a quantized model is for generation; train from the float32" in \
        assert_clean_error(code, err, 1)


@pytest.mark.parametrize("argv, prompts, message, status", [
    (["-p", "the"], "the fox\n", "--prompts gives every prompt: it goes without -p/--prompt "
                                 "and -i/--interactive", 2),
    (["-i"], "the fox\n", "--prompts gives every prompt", 2),
    ([], "\n  \n\n", "the prompts file holds no prompt (one a line; blank lines are skipped)", 1),
    ([], b"the fox\n\xff\xfe\n", "the prompts file is not UTF-8 text (invalid start byte at "
                                 "byte 8)", 1),
    ([], "the fox\n\nthe \u00ff\n", "prompts.txt, line 3: ", 1),
])
def test_bad_prompts(argv, prompts, message, status, float_model, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    if isinstance(prompts, bytes):
        path.write_bytes(prompts)
    else:
        path.write_text(prompts)
    code, out, err = run_cli(capsys, "infer", "-m", float_model, "--prompts", path, *argv)
    assert message in assert_clean_error(code, err, status)
    assert out == ""


def test_help(capsys):
    code, out, _ = run_cli(capsys, "help")
    assert code == 0 and re.search(r"quantize +quantize a model's weights to int8 or bf16", out)
    code, out, _ = run_cli(capsys, "help", "quantize")
    assert code == 0
    assert out.startswith("usage: cllm quantize [-h] -m FILE -o FILE --to {bf16,int8}")
    code, out, _ = run_cli(capsys, "help", "infer")
    assert code == 0 and "--prompts FILE" in out
