"""`cllm import` and `cllm export`: Hugging Face GPT-2 folders in, Hugging Face folders and GGUF
files out. The folders are written here as transformers and the hub lay them out (safetensors
from the safetensors package, config.json by hand, a byte-level BPE trained here with
tokenizers); no network, no torch."""
import importlib.util
import json
import math
import struct

import numpy as np
import pytest
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cli_helpers import assert_clean_error, run_cli, write_corpus
from cllm import Model, ModelConfig, crystal
from cllm.config import GPT2_SWITCHES
from cllm.data import open_dataset
from cllm.tokenizer import encode, train_bpe, train_char, tokenizer_to_json

TEXTS = ["The quick brown fox jumps over the lazy dog. Ünïcödé ßträßé, 漢字 😀.\n"] * 40
N_CTX, C, L, H = 24, 16, 2, 2
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def bpe():
    """GPT-2's kind of tokenizer: byte-level BPE with <|endoftext|>, trained here."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def hf_config(vocab_size, **changes):
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size,
                  n_positions=N_CTX, n_embd=C, n_layer=L, n_head=H, n_inner=None,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    config.update(changes)
    return config


def gpt2_tensors(config, seed=0, prefix="transformer."):
    """Random GPT-2 parameters under transformers' names, with shapes written out here."""
    rng = np.random.default_rng(seed)
    V, n, F = config["vocab_size"], config["n_positions"], config["n_inner"] or 4 * C

    def draw(*shape):
        return rng.normal(0, 0.5, shape).astype(np.float32)

    t = {f"{prefix}wte.weight": draw(V, C), f"{prefix}wpe.weight": draw(n, C),
         f"{prefix}ln_f.weight": draw(C), f"{prefix}ln_f.bias": draw(C)}
    for i in range(config["n_layer"]):
        h = f"{prefix}h.{i}."
        t.update({h + "ln_1.weight": draw(C), h + "ln_1.bias": draw(C),
                  h + "attn.c_attn.weight": draw(C, 3 * C), h + "attn.c_attn.bias": draw(3 * C),
                  h + "attn.c_proj.weight": draw(C, C), h + "attn.c_proj.bias": draw(C),
                  h + "ln_2.weight": draw(C), h + "ln_2.bias": draw(C),
                  h + "mlp.c_fc.weight": draw(C, F), h + "mlp.c_fc.bias": draw(F),
                  h + "mlp.c_proj.weight": draw(F, C), h + "mlp.c_proj.bias": draw(C)})
    return t


def ours(name):
    """transformers' name -> cllm's, written out independently of cllm.interop."""
    if name == "lm_head.weight":
        return name
    name = name[len("transformer."):] if name.startswith("transformer.") else name
    return {"wte.weight": "wte", "wpe.weight": "wpe"}.get(name, name)


def write_folder(folder, tokenizer, layout="transformers", tokenizer_files="json",
                 config_changes=None, seed=0):
    """A GPT-2 checkpoint folder in one of the layouts found in the wild; returns its
    config.json and its tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(tokenizer.get_vocab_size(), **(config_changes or {}))
    prefix = "" if layout == "original" else "transformer."
    tensors = gpt2_tensors(config, seed, prefix)
    if layout == "original":       # the hub's gpt2: no prefix, the causal-mask buffers saved
        for i in range(L):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, N_CTX, N_CTX), np.float32))
            tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    if layout == "lm_head_equal":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    if layout == "untied":
        config["tie_word_embeddings"] = False
        tensors["lm_head.weight"] = gpt2_tensors(config, seed + 1)["transformer.wte.weight"]
    (folder / "config.json").write_text(json.dumps(config))
    if layout == "sharded":
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:10],
                  "model-00002-of-00002.safetensors": names[10:]}
        for shard, part in shards.items():
            save_file({k: tensors[k] for k in part}, folder / shard, metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: s for s, part in shards.items() for k in part}}))
    elif layout == "f16":
        save_file({k: v.astype(np.float16) for k, v in tensors.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
        tensors = {k: v.astype(np.float16).astype(np.float32) for k, v in tensors.items()}
    elif layout == "bf16":
        # numpy has no bfloat16: truncate float32 to its upper half and write the file by hand
        halves = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in tensors.items()}
        write_raw_safetensors(folder / "model.safetensors", {
            k: ("BF16", v.shape, v.tobytes()) for k, v in halves.items()})
        tensors = {k: (v.astype(np.uint32) << 16).view(np.float32) for k, v in halves.items()}
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_files == "json":
        tokenizer.save(str(folder / "tokenizer.json"))
    elif tokenizer_files == "vocab":
        tokenizer.model.save(str(folder))   # vocab.json and merges.txt, as GPT-2 ships them
    return config, tensors


def write_raw_safetensors(path, entries):
    """name -> (dtype, shape, data bytes), laid out by hand."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw
                     + b"".join(data for _, _, data in entries.values()))


def own_model(config, tensors):
    """cllm's own model of the same weights, built without cllm.interop."""
    cfg = ModelConfig(vocab_size=config["vocab_size"], n_ctx=config["n_positions"], n_embd=C,
                      n_layer=L, n_head=H, n_inner=config["n_inner"],
                      tie_embeddings=config["tie_word_embeddings"], **GPT2_SWITCHES)
    model = Model(cfg)
    for name, array in tensors.items():
        if ours(name) in model.params:
            model.params[ours(name)][...] = array
    return model


def import_folder(capsys, folder, out):
    code, stdout, err = run_cli(capsys, "import", folder, "-o", out)
    assert code == 0, err
    return stdout


# ---- import ----

@pytest.mark.parametrize("layout, tokenizer_files", [
    ("transformers", "json"), ("original", "vocab"), ("lm_head_equal", "json"),
    ("untied", "vocab"), ("sharded", "json"), ("f16", "json"), ("bf16", "json")])
def test_import_layouts(tmp_path, capsys, bpe, layout, tokenizer_files):
    config, tensors = write_folder(tmp_path / "gpt2", bpe, layout, tokenizer_files)
    stdout = import_folder(capsys, tmp_path / "gpt2", tmp_path / "m.cllm")
    assert "cllm infer -m" in stdout and "cllm train --init-from" in stdout
    model = Model.load(tmp_path / "m.cllm")
    untied = layout == "untied"
    assert model.config == ModelConfig(vocab_size=bpe.get_vocab_size(), n_ctx=N_CTX, n_embd=C,
                                       n_layer=L, n_head=H, n_inner=4 * C,
                                       tie_embeddings=not untied, **GPT2_SWITCHES)
    # tensor by tensor: every parameter, and nothing else (buffers and a tied head dropped)
    expected = {ours(k): v for k, v in tensors.items()
                if ".attn.bias" not in k and ".attn.masked_bias" not in k
                and (k != "lm_head.weight" or untied)}
    assert set(model.params) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(model.params[name], array, err_msg=name)
    idx = np.random.default_rng(1).integers(0, config["vocab_size"], (2, N_CTX))
    np.testing.assert_array_equal(model.forward(idx), own_model(config, tensors).forward(idx))
    # the tokenizer travelled: the same ids as the one the folder was written from
    text = "The lazy fox, 漢字 😀" + EOT
    assert encode(model.tokenizer, text) == bpe.encode(text).ids
    assert bpe.token_to_id(EOT) in encode(model.tokenizer, text)


def test_import_sets_n_inner_from_the_config(tmp_path, capsys, bpe):
    write_folder(tmp_path / "gpt2", bpe, config_changes={"n_inner": 40})
    import_folder(capsys, tmp_path / "gpt2", tmp_path / "m.cllm")
    assert Model.load(tmp_path / "m.cllm").config.n_inner == 40


def snapshot(cache, repo, bpe, commit="0123456789abcdef0123456789abcdef01234567", ref=True):
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    write_folder(folder, bpe)
    if ref:
        (folder.parent.parent / "refs").mkdir()
        (folder.parent.parent / "refs" / "main").write_text(commit)
    return folder


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_import_by_name_from_the_hugging_face_cache(tmp_path, capsys, bpe, monkeypatch,
                                                    variable):
    home = tmp_path / "hf"
    cache = home / "hub" if variable == "HF_HOME" else home
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(home))
    monkeypatch.chdir(tmp_path)
    folder = snapshot(cache, "gpt2", bpe)
    # an older snapshot without refs/main beside it is not the one taken
    write_folder(folder.parent / ("f" * 40), bpe, seed=5)
    stdout = import_folder(capsys, "gpt2", tmp_path / "m.cllm")
    assert str(folder) in stdout
    # a bare name finds a model filed under its organisation, here with no refs/main
    snapshot(cache, "distilbert/distilgpt2", bpe, ref=False)
    import_folder(capsys, "distilgpt2", tmp_path / "d.cllm")
    assert Model.load(tmp_path / "d.cllm").config.n_layer == L


def test_import_of_a_model_not_in_the_cache_says_how_to_fetch_it(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "import", "gpt2", "-o", tmp_path / "m.cllm")
    line = assert_clean_error(code, err, 1)
    assert "huggingface-cli download gpt2 --include '*.json' '*.safetensors' '*.txt'" in line
    assert not (tmp_path / "m.cllm").exists()


def set_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def replace_tensor(folder, name, array):
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = array
    save_file(tensors, folder / "model.safetensors")


def remove_tensor(folder, name):
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")


def pickle_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


def damage_header(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + data[8:])


def point_outside(folder):
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [1 << 40, (1 << 40) + 16]}
    raw = json.dumps({"transformer.wte.weight": entry}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))


def shard_outside(folder):
    (folder / "model.safetensors").rename(folder / "x.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "../x.safetensors"}}))


def shrink_vocabulary(folder):
    config = json.loads((folder / "config.json").read_text())
    set_config(folder, vocab_size=config["vocab_size"] - 1)


def huge_config(folder):
    (folder / "config.json").write_text(" " * (1 << 20) + "{}")


REFUSALS = {
    "pickle": (pickle_only, "pytorch_model.bin is a pickle file, and loading one runs code"),
    "model type": (lambda f: set_config(f, model_type="llama"), "model_type 'llama' is not GPT-2"),
    "architecture": (lambda f: set_config(f, architectures=["GPT2ForSequenceClassification"]),
                     "GPT2LMHeadModel and GPT2Model only"),
    "activation": (lambda f: set_config(f, activation_function="gelu"),
                   "activation_function 'gelu': cllm computes GELU with the tanh approximation"
                   " only (gelu_new"),
    "epsilon": (lambda f: set_config(f, layer_norm_epsilon=1e-6),
                "layer_norm_epsilon 1e-06: cllm's LayerNorm uses epsilon 1e-05 only"),
    "inverse layer idx": (lambda f: set_config(f, scale_attn_by_inverse_layer_idx=True),
                          "scale_attn_by_inverse_layer_idx is true"),
    "reorder and upcast": (lambda f: set_config(f, reorder_and_upcast_attn=True),
                           "reorder_and_upcast_attn is true"),
    "unscaled attention": (lambda f: set_config(f, scale_attn_weights=False),
                           "scale_attn_weights is false"),
    "shape": (lambda f: set_config(f, n_embd=32), "but config.json makes it"),
    "integer tensor": (lambda f: replace_tensor(f, "transformer.ln_f.bias",
                                                np.zeros(C, np.int32)),
                       "holds I32; GPT-2 parameters are floating-point"),
    "missing tensor": (lambda f: remove_tensor(f, "transformer.ln_f.bias"),
                       "tensor 'transformer.ln_f.bias' is missing"),
    "foreign tensor": (lambda f: replace_tensor(f, "multiple_choice_head.summary.weight",
                                                np.zeros((1, C), np.float32)),
                       "is not part of a GPT-2"),
    "tied head differs": (lambda f: replace_tensor(f, "lm_head.weight", np.ones_like(
                              load_file(f / "model.safetensors")["transformer.wte.weight"])),
                          "set \"tie_word_embeddings\": false in config.json"),
    "untied head missing": (lambda f: set_config(f, tie_word_embeddings=False),
                            "lm_head.weight is missing"),
    "damaged header": (damage_header, "not a safetensors file"),
    "data outside the file": (point_outside, "lies outside the"),
    "shard outside the folder": (shard_outside, "is not a .safetensors file name in the folder"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), "not valid JSON"),
    "config too large": (huge_config, "is too large for a model configuration"),
    "huge vocabulary": (lambda f: set_config(f, vocab_size=1 << 40),
                        "vocab_size must be an integer from 1 to"),
    "heads": (lambda f: set_config(f, n_head=3), "n_embd (16) is not divisible by n_head (3)"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
    "tokenizer too large": (shrink_vocabulary, "tokens but the model only"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refusals(tmp_path, capsys, bpe, case):
    spoil, message = REFUSALS[case]
    write_folder(tmp_path / "gpt2", bpe)
    spoil(tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "import", tmp_path / "gpt2", "-o", tmp_path / "m.cllm")
    assert message in assert_clean_error(code, err, 1)
    assert not (tmp_path / "m.cllm").exists()


def test_import_refuses_a_merge_of_unknown_tokens(tmp_path, capsys, bpe):
    write_folder(tmp_path / "gpt2", bpe, tokenizer_files="vocab")
    with open(tmp_path / "gpt2" / "merges.txt", "a") as f:
        f.write("nosuch token\n")
    code, _, err = run_cli(capsys, "import", tmp_path / "gpt2", "-o", tmp_path / "m.cllm")
    assert "not a merge of two tokens of vocab.json" in assert_clean_error(code, err, 1)


def test_imported_model_fine_tunes_with_its_tokenizer(tmp_path, capsys, bpe):
    write_folder(tmp_path / "gpt2", bpe)
    import_folder(capsys, tmp_path / "gpt2", tmp_path / "m.cllm")
    corpus = write_corpus(tmp_path / "notes", files=2, lines=40)
    code, out, err = run_cli(capsys, "train", "--init-from", tmp_path / "m.cllm", "-d", corpus,
                             "-c", tmp_path / "run", "-s", 16, "-b", 4, "-t", 1, "--warmup", 1,
                             "--max-steps", 12, "-r", 1e-2, "--val-fraction", 0.2)
    assert code == 0, err
    # fine-tuning lowers the loss on the new text: the held-out split's, at the end, against
    # the imported model's on the same windows
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    final = next(r["final_val_loss"] for r in records if "final_val_loss" in r)
    before = Model.load(tmp_path / "m.cllm")
    val = open_dataset(tmp_path / "run" / "dataset.bin")
    val = np.asarray(val[len(val) - int(0.2 * len(val)):], dtype=np.int64)
    windows = (len(val) - 1) // 16
    x = val[:windows * 16].reshape(windows, 16)
    y = val[1:windows * 16 + 1].reshape(windows, 16)
    assert final < before.loss(x, y).ce
    tuned = Model.load(tmp_path / "run" / "final_model.cllm")
    assert tokenizer_to_json(tuned.tokenizer) == tokenizer_to_json(
        Model.load(tmp_path / "m.cllm").tokenizer)
    assert tuned.config.vocab_size == bpe.get_vocab_size()


# ---- export to Hugging Face ----

def hf_names(config):
    names = ["transformer.wte.weight"]
    if config.position == "learned":
        names.append("transformer.wpe.weight")
    for i in range(config.n_layer):
        names += [f"transformer.h.{i}.{part}.{kind}" for part in (
            "ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
            for kind in ("weight", "bias")]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return names + ([] if config.tie_embeddings else ["lm_head.weight"])


@pytest.mark.parametrize("tie", [True, False])
def test_export_hf_gpt2(tmp_path, capsys, tie):
    tokenizer = train_bpe(TEXTS, 280)
    config = ModelConfig(vocab_size=280, n_ctx=N_CTX, n_embd=C, n_layer=L, n_head=H,
                         tie_embeddings=tie, **{**GPT2_SWITCHES, "loss": "crystalline"})
    model = Model.create(config, seed=3, tokenizer=tokenizer)
    model.save(tmp_path / "m.cllm")
    code, out, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "hf",
                             tmp_path / "hf")
    assert code == 0, err
    assert "AutoModelForCausalLM.from_pretrained" in out and "trust_remote_code" not in out
    out_dir = tmp_path / "hf"
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    tensors = load_file(out_dir / "model.safetensors")
    assert sorted(tensors) == sorted(hf_names(config))
    for name, array in tensors.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, model.params[ours(name)], err_msg=name)
    with safe_open(out_dir / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    hf = json.loads((out_dir / "config.json").read_text())
    assert hf["architectures"] == ["GPT2LMHeadModel"] and hf["model_type"] == "gpt2"
    assert {k: hf[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                               "n_inner", "tie_word_embeddings")} == dict(
        vocab_size=280, n_positions=N_CTX, n_embd=C, n_layer=L, n_head=H, n_inner=4 * C,
        tie_word_embeddings=tie)
    assert hf["activation_function"] == "gelu_new" and hf["layer_norm_epsilon"] == 1e-5
    assert hf["bos_token_id"] is None and hf["eos_token_id"] is None
    assert "auto_map" not in hf
    assert (out_dir / "tokenizer.json").read_text() == tokenizer_to_json(tokenizer)
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert tok_config == {"tokenizer_class": "PreTrainedTokenizerFast",
                          "model_max_length": N_CTX, "clean_up_tokenization_spaces": False}
    assert json.loads((out_dir / "generation_config.json").read_text()) == {
        "bos_token_id": None, "eos_token_id": None}
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]   # no temporaries


@pytest.mark.parametrize("layout", ["transformers", "untied", "lm_head_equal"])
def test_round_trip_is_bitwise(tmp_path, capsys, bpe, layout):
    _, source = write_folder(tmp_path / "gpt2", bpe, layout)
    import_folder(capsys, tmp_path / "gpt2", tmp_path / "m.cllm")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "hf",
                           tmp_path / "hf")
    assert code == 0, err
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    # a tied head is wte: transformers saves it once, as wte
    assert set(exported) == set(source) - ({"lm_head.weight"} if layout != "untied" else set())
    for name, array in exported.items():
        assert array.tobytes() == source[name].tobytes(), name
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["bos_token_id"] == hf["eos_token_id"] == bpe.token_to_id(EOT)
    tok_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == tok_config["bos_token"] == EOT
    assert Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(
        "fox " + EOT).ids == bpe.encode("fox " + EOT).ids


def load_standalone(path):
    """A module from a file, outside any package (as transformers loads remote code)."""
    spec = importlib.util.spec_from_file_location(f"standalone_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("position, attention", [("angular", "ulam"), ("learned", "ulam"),
                                                 ("angular", "dense")])
def test_export_hf_crystalline(tmp_path, capsys, position, attention):
    tokenizer = train_char(TEXTS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_ctx=N_CTX, n_embd=C,
                         n_layer=L, n_head=H, position=position, attention=attention,
                         ulam_radius=1)
    model = Model.create(config, seed=0, tokenizer=tokenizer)
    model.save(tmp_path / "m.cllm")
    code, out, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "hf",
                             tmp_path / "hf")
    assert code == 0, err
    assert "trust_remote_code=True" in out
    out_dir = tmp_path / "hf"
    hf = json.loads((out_dir / "config.json").read_text())
    assert hf["model_type"] == "cllm" and hf["architectures"] == ["CllmForCausalLM"]
    assert hf["auto_map"] == {"AutoConfig": "configuration_cllm.CllmConfig",
                              "AutoModelForCausalLM": "modeling_cllm.CllmForCausalLM"}
    assert (hf["position"], hf["attention"], hf["ulam_radius"]) == (position, attention, 1)
    assert sorted(load_file(out_dir / "model.safetensors")) == sorted(hf_names(config))
    # the tables of the exported model come from crystal.py as written beside it, a module
    # that must stand alone (transformers loads it outside any package)
    tables = load_standalone(out_dir / "crystal.py")
    for got, want in zip(tables.angular_tables(N_CTX, H, C // H),
                         crystal.angular_tables(N_CTX, H, C // H)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(tables.ulam_neighbours(N_CTX, 1), crystal.ulam_neighbours(N_CTX, 1)):
        np.testing.assert_array_equal(got, want)
    for name in ("modeling_cllm.py", "configuration_cllm.py"):
        source = (out_dir / name).read_text()
        compile(source, name, "exec")
        imported = {line.split()[1] for line in source.splitlines()
                    if line.startswith(("import ", "from "))}
        assert imported <= {"math", "numpy", "torch", "torch.nn.functional", "torch.nn",
                            "transformers", "transformers.modeling_outputs",
                            ".configuration_cllm", ".crystal"}, imported
    # a character tokenizer goes out as it is, with no special token invented for it
    assert json.loads((out_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert (out_dir / "tokenizer.json").read_text() == tokenizer_to_json(tokenizer)


def test_export_refusals(tmp_path, capsys):
    model = Model.create(ModelConfig(vocab_size=50, n_ctx=8, n_embd=8, n_layer=1, n_head=2,
                                     **GPT2_SWITCHES))
    model.save(tmp_path / "m.cllm")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "hf",
                           tmp_path / "hf", "--type", "f16")
    assert "--type chooses the tensor type of a GGUF file" in assert_clean_error(code, err, 1)
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                           tmp_path / "m.gguf")
    assert "the model has no tokenizer" in assert_clean_error(code, err, 1)
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "none.cllm", "--to", "hf",
                           tmp_path / "hf")
    assert "none.cllm" in assert_clean_error(code, err, 1)
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "hf",
                           tmp_path / "file")
    assert "a file; give a folder" in assert_clean_error(code, err, 1)
    assert not (tmp_path / "m.gguf").exists()


# ---- export to GGUF ----

def gguf_fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def gguf_tensors(reader):
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("type_name", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_export_gguf(tmp_path, capsys, bpe, type_name, tie):
    write_folder(tmp_path / "gpt2", bpe, "transformers" if tie else "untied",
                 config_changes={"n_inner": 40})
    import_folder(capsys, tmp_path / "gpt2", tmp_path / "m.cllm")
    model = Model.load(tmp_path / "m.cllm")
    code, out, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                             tmp_path / "m.gguf", "--type", type_name)
    assert code == 0, err
    assert "llama-cli -m" in out and "--ignore-eos" not in out
    reader = GGUFReader(tmp_path / "m.gguf")
    fields = gguf_fields(reader)
    V, F = model.config.vocab_size, 40
    assert fields["general.architecture"] == "gpt2"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[type_name]
    assert {k: fields[f"gpt2.{k}"] for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count",
        "attention.head_count")} == {"context_length": N_CTX, "embedding_length": C,
                                     "feed_forward_length": F, "block_count": L,
                                     "attention.head_count": H}
    assert math.isclose(fields["gpt2.attention.layer_norm_epsilon"], 1e-5, rel_tol=1e-6)
    # the tokenizer: GPT-2's byte-level BPE with its merges, special tokens as control tokens
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = bpe.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    eot = bpe.token_to_id(EOT)
    assert fields["tokenizer.ggml.token_type"] == [
        TokenType.CONTROL if i == eot else TokenType.NORMAL for i in range(V)]
    merges = json.loads(bpe.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                                for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is False
    # the tensors: llama.cpp's names and layouts (Conv1D weights transposed); 1-D tensors and
    # the position table in float32
    p = model.params
    expected = {"token_embd.weight": p["wte"], "position_embd.weight": p["wpe"],
                "output_norm.weight": p["ln_f.weight"], "output_norm.bias": p["ln_f.bias"],
                "output.weight": p["wte"] if tie else p["lm_head.weight"]}
    for i in range(L):
        for theirs, mine in (("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"),
                             ("attn_output", "attn.c_proj"), ("ffn_norm", "ln_2"),
                             ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")):
            weight = p[f"h.{i}.{mine}.weight"]
            expected[f"blk.{i}.{theirs}.weight"] = weight.T if weight.ndim == 2 else weight
            expected[f"blk.{i}.{theirs}.bias"] = p[f"h.{i}.{mine}.bias"]
    tensors = gguf_tensors(reader)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(want.shape)), name
        kept_f32 = want.ndim == 1 or name == "position_embd.weight"
        # Q8_0 blocks are rows of 32: ffn_down's rows (n_inner = 40) fall back to F16
        wanted_type = "F32" if kept_f32 or type_name == "f32" else \
            "F16" if type_name == "f16" or want.shape[-1] % 32 else "Q8_0"
        assert t.tensor_type.name == wanted_type, name
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        if wanted_type == "F32":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            step = np.abs(want).max() / (127 if wanted_type == "Q8_0" else 1000)
            np.testing.assert_allclose(got, want, atol=step, err_msg=name)


def llama_cpp_bpe(text, tokens, merges):
    """llama.cpp's BPE on one pre-token: its bytes as GPT-2 characters, the lowest-ranked
    adjacent pair merged until none is left, each piece then looked up (unknown pieces
    skipped)."""
    from cllm.tokenizer import byte_level_spelling
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = list(byte_level_spelling(text))
    while True:
        pairs = [(rank.get((a, b), math.inf), i) for i, (a, b) in
                 enumerate(zip(pieces, pieces[1:]))]
        best, at = min(pairs, default=(math.inf, 0))
        if best == math.inf:
            return [ids[p] for p in pieces if p in ids]
        pieces[at:at + 2] = [pieces[at] + pieces[at + 1]]


def test_export_gguf_of_a_character_tokenizer(tmp_path, capsys):
    tokenizer = train_char(TEXTS)
    model = Model.create(ModelConfig(vocab_size=tokenizer.get_vocab_size() + 3, n_ctx=N_CTX,
                                     n_embd=C, n_layer=1, n_head=H, **GPT2_SWITCHES),
                         tokenizer=tokenizer)
    model.save(tmp_path / "m.cllm")
    code, out, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                             tmp_path / "m.gguf", "--type", "f16")
    assert code == 0, err
    assert "--ignore-eos" in out   # no end-of-text token: llama.cpp needs telling
    fields = gguf_fields(GGUFReader(tmp_path / "m.gguf"))
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    V = tokenizer.get_vocab_size()
    assert tokens[V:] == [f"[PAD{i}]" for i in range(V, V + 3)]
    assert fields["tokenizer.ggml.token_type"][V:] == [TokenType.UNUSED] * 3
    assert "tokenizer.ggml.eos_token_id" not in fields
    # llama.cpp's merges give one token per character, the character's own id, for every
    # character (multi-byte ones included), in any order of neighbours
    text = TEXTS[0] + "".join(reversed(TEXTS[0]))
    assert llama_cpp_bpe(text, tokens, merges) == encode(tokenizer, text)


def test_export_gguf_of_an_ascii_character_tokenizer(tmp_path, capsys):
    """No character needs a merge, and llama.cpp needs at least one: one that never applies."""
    tokenizer = train_char(["the quick brown fox\n"])
    model = Model.create(ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_ctx=N_CTX,
                                     n_embd=C, n_layer=1, n_head=H, **GPT2_SWITCHES),
                         tokenizer=tokenizer)
    model.save(tmp_path / "m.cllm")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                           tmp_path / "m.gguf")
    assert code == 0, err
    fields = gguf_fields(GGUFReader(tmp_path / "m.gguf"))
    assert len(fields["tokenizer.ggml.merges"]) == 1
    text = "the fox quick brown\n"
    assert llama_cpp_bpe(text, fields["tokenizer.ggml.tokens"],
                         fields["tokenizer.ggml.merges"]) == encode(tokenizer, text)


@pytest.mark.parametrize("changes, message", [
    ({"position": "angular"}, "cannot express position 'angular'"),
    ({"attention": "ulam"}, "cannot express attention 'ulam'")])
def test_export_gguf_refuses_what_llama_cpp_cannot_express(tmp_path, capsys, changes, message):
    tokenizer = train_char(TEXTS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_ctx=N_CTX, n_embd=C,
                         n_layer=1, n_head=H, **{**GPT2_SWITCHES, **changes})
    Model.create(config, tokenizer=tokenizer).save(tmp_path / "m.cllm")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                           tmp_path / "m.gguf")
    assert message in assert_clean_error(code, err, 1)
    assert not (tmp_path / "m.gguf").exists()


def test_export_gguf_refuses_a_bpe_unlike_gpt2s(tmp_path, capsys):
    tokenizer = train_bpe(TEXTS, 280)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    config = ModelConfig(vocab_size=280, n_ctx=N_CTX, n_embd=C, n_layer=1, n_head=H,
                         **GPT2_SWITCHES)
    Model.create(config, tokenizer=tokenizer).save(tmp_path / "m.cllm")
    code, _, err = run_cli(capsys, "export", "-m", tmp_path / "m.cllm", "--to", "gguf",
                           tmp_path / "m.gguf")
    assert "pre-tokenizer" in assert_clean_error(code, err, 1)
