import json
import os
import re

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from cllm import fileio
from cllm.checkpoint import (
    checkpoint_path, list_checkpoints, load_cllm, prune_checkpoints, save_cllm,
)
from cllm.config import GPT2_SWITCHES, ModelConfig
from cllm.errors import CheckpointError

CONFIG = ModelConfig(vocab_size=11, n_ctx=8, n_embd=4, n_layer=2, n_head=2, **GPT2_SWITCHES)
TOKENIZER_JSON = '{"model": {"type": "WordLevel", "vocab": {"é": 0}}}'
TRAINING = {"step": 7, "rng": {"state": 2**100, "inc": 3}, "position": [1, 2], "args": {"lr": 3e-4}}


def random_tensors(config, seed):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in config.tensor_shapes()}


@pytest.fixture
def params():
    return random_tensors(CONFIG, 0)


@pytest.fixture
def optimizer():
    return {"m": random_tensors(CONFIG, 1), "v": random_tensors(CONFIG, 2)}


@pytest.fixture
def training_file(tmp_path, params, optimizer):
    path = tmp_path / "checkpoint_step_7.cllm"
    save_cllm(path, params, CONFIG, TOKENIZER_JSON, optimizer, TRAINING)
    return path


def assert_tensors_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == np.float32 and a[name].shape == b[name].shape
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("use_mmap", [True, False])
def test_round_trip(training_file, params, optimizer, use_mmap):
    loaded = load_cllm(training_file, mmap=use_mmap)
    assert loaded.config == CONFIG
    assert loaded.tokenizer_json == TOKENIZER_JSON
    assert loaded.training == TRAINING
    assert_tensors_equal(loaded.params, params)
    assert_tensors_equal(loaded.optimizer["m"], optimizer["m"])
    assert_tensors_equal(loaded.optimizer["v"], optimizer["v"])
    assert loaded.params["wte"].flags.writeable is not use_mmap


def test_model_only_file(tmp_path, params):
    config = ModelConfig(vocab_size=11, n_ctx=8, n_embd=4, n_layer=2, n_head=2,
                         tie_embeddings=False, n_inner=6)
    params = random_tensors(config, 3)
    save_cllm(tmp_path / "m.cllm", params, config, None)
    loaded = load_cllm(tmp_path / "m.cllm")
    assert loaded.config == config and "lm_head.weight" in loaded.params
    assert loaded.tokenizer_json is None and loaded.optimizer is None and loaded.training is None
    assert_tensors_equal(loaded.params, params)


def test_non_contiguous_and_float64_inputs_are_stored_as_float32(tmp_path, params):
    params["wte"] = np.asfortranarray(params["wte"].astype(np.float64))
    save_cllm(tmp_path / "m.cllm", params, CONFIG, None)
    loaded = load_cllm(tmp_path / "m.cllm")
    assert np.array_equal(loaded.params["wte"], params["wte"].astype(np.float32))


def test_safetensors_library_reads_our_files(training_file, params, optimizer):
    tensors = safetensors.numpy.load_file(training_file)
    assert len(tensors) == 3 * len(params)
    assert np.array_equal(tensors["h.1.mlp.c_fc.weight"], params["h.1.mlp.c_fc.weight"])
    assert np.array_equal(tensors["optim.v.wpe"], optimizer["v"]["wpe"])
    with safe_open(training_file, framework="numpy") as f:
        metadata = f.metadata()
    assert metadata["format"] == "cllm" and metadata["format_version"] == "1"
    assert ModelConfig.from_dict(json.loads(metadata["config"])) == CONFIG
    assert json.loads(metadata["training"]) == TRAINING


def test_we_read_files_of_the_safetensors_library(tmp_path, params):
    metadata = {"format": "cllm", "format_version": "1", "config": CONFIG.to_json()}
    (tmp_path / "m.cllm").write_bytes(safetensors.numpy.save(params, metadata=metadata))
    assert_tensors_equal(load_cllm(tmp_path / "m.cllm").params, params)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="m.cllm: no such file"):
        load_cllm(tmp_path / "m.cllm")


def test_truncated_everywhere(training_file, tmp_path):
    data = training_file.read_bytes()
    cut_file = tmp_path / "cut.cllm"
    cuts = sorted({*range(0, 300, 7), *range(300, len(data), len(data) // 97), len(data) - 1})
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.cllm: truncated") as info:
            load_cllm(cut_file)
        assert "\n" not in str(info.value)


def header_length(path):
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_header_corruption_never_escapes_as_another_error(training_file, data):
    original = training_file.read_bytes()
    corrupt = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, header_length(training_file) - 1))] = \
            data.draw(st.integers(0, 255))
    training_file.write_bytes(bytes(corrupt))
    try:
        load_cllm(training_file)
    except CheckpointError:
        pass
    finally:
        training_file.write_bytes(original)


@pytest.mark.parametrize("old, new, message", [
    (b'"F32"', b'"F16"', "has dtype 'F16' but .cllm files hold float32"),
    (b'"format":"cllm"', b'"format":"gguf"', "not a .cllm file"),
    (b'"format_version":"1"', b'"format_version":"9"', "format version '9' is not supported"),
    (b'{"__metadata__"', b'["__metadata__"', "header is not valid JSON"),
    (b'"data_offsets":[0,', b'"data_offsets":[4,', "do not agree"),
    (b'\\"n_layer\\": 2', b'\\"n_layer\\": 3', "tensor h.2.ln_1.weight is missing"),
    (b'\\"n_embd\\": 4', b'\\"n_embd\\": 6',
     "has shape (11, 4) but the configuration needs (11, 6)"),
    (b'\\"n_head\\": 2', b'\\"n_head\\": 3', "invalid model configuration: n_embd"),
    (b'"training":"{', b'"training":"[', "invalid training state"),
])
def test_header_corruptions_with_clear_messages(training_file, old, new, message):
    data = training_file.read_bytes()
    assert old in data
    training_file.write_bytes(data.replace(old, new, 1))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_cllm(training_file)


@pytest.mark.parametrize("prefix, message", [
    ((2**62).to_bytes(8, "little"), "implausible header length"),
    ((10**7).to_bytes(8, "little"), "truncated"),
    ((1000).to_bytes(8, "little"), "header is not valid JSON"),
])
def test_bad_length_prefix(training_file, prefix, message):
    training_file.write_bytes(prefix + training_file.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=message):
        load_cllm(training_file)


def test_text_file_is_not_a_cllm_file(tmp_path):
    (tmp_path / "notes.cllm").write_text("just some notes, not a model\n")
    with pytest.raises(CheckpointError, match="notes.cllm: not a .cllm file"):
        load_cllm(tmp_path / "notes.cllm")


def test_foreign_safetensors_file(tmp_path, params):
    (tmp_path / "model.safetensors").write_bytes(safetensors.numpy.save(params))
    with pytest.raises(CheckpointError, match="safetensors file without cllm metadata"):
        load_cllm(tmp_path / "model.safetensors")


def test_trailing_bytes_are_damage(training_file):
    with open(training_file, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="8 unexpected bytes after the tensor data"):
        load_cllm(training_file)


def test_unexpected_and_partial_optimizer_tensors(tmp_path, params, optimizer):
    metadata = {"format": "cllm", "format_version": "1", "config": CONFIG.to_json()}
    extra = {**params, "lm_head.weight": params["wte"]}
    (tmp_path / "a.cllm").write_bytes(safetensors.numpy.save(extra, metadata=metadata))
    with pytest.raises(CheckpointError, match="unexpected tensor lm_head.weight"):
        load_cllm(tmp_path / "a.cllm")
    partial = {**params, "optim.m.wte": optimizer["m"]["wte"]}
    (tmp_path / "b.cllm").write_bytes(safetensors.numpy.save(partial, metadata=metadata))
    with pytest.raises(CheckpointError, match="tensor optim.m.wpe is missing"):
        load_cllm(tmp_path / "b.cllm")


def test_save_checks_shapes_against_the_config(tmp_path, params, optimizer):
    params["h.0.ln_1.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointError, match=r"tensor h.0.ln_1.bias has shape \(5,\) but the "
                                              r"configuration needs \(4,\)"):
        save_cllm(tmp_path / "m.cllm", params, CONFIG, None)
    del optimizer["v"]["wte"]
    with pytest.raises(CheckpointError, match="tensor optim.v.wte is missing"):
        save_cllm(tmp_path / "m.cllm", random_tensors(CONFIG, 0), CONFIG, None, optimizer)
    assert os.listdir(tmp_path) == []


def test_interrupted_save_keeps_the_old_file(training_file, params, monkeypatch):
    """Killed after writing everything but before the rename: the old checkpoint survives."""
    before = training_file.read_bytes()

    class Killed(BaseException):
        pass

    def killed(fd):
        raise Killed

    monkeypatch.setattr(fileio.os, "fsync", killed)
    with pytest.raises(Killed):
        save_cllm(training_file, params, CONFIG, None)
    assert training_file.read_bytes() == before
    assert os.listdir(training_file.parent) == [training_file.name]


def test_list_and_prune_checkpoints(tmp_path, params):
    assert list_checkpoints(tmp_path / "none") == []
    for step in [5, 100, 20, 3]:
        checkpoint_path(tmp_path, step).write_bytes(b"")
    (tmp_path / "checkpoint_step_x.cllm").write_bytes(b"")
    (tmp_path / ".checkpoint_step_7.cllm.abc.tmp").write_bytes(b"")
    (tmp_path / "model.cllm").write_bytes(b"")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100, 20, 5, 3]
    assert list_checkpoints(tmp_path)[0][1] == tmp_path / "checkpoint_step_100.cllm"
    removed = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint_step_3.cllm", "checkpoint_step_5.cllm"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100, 20]
    assert (tmp_path / "model.cllm").exists()
