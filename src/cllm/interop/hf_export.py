"""`cllm export --to hf`: a folder that transformers loads with
AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained.

A model with learned positions and dense attention is GPT-2 exactly (init and loss only change
training), so it becomes a plain GPT2LMHeadModel. Angular positions or Ulam attention have no
GPT-2 equivalent: such a model comes with its own modeling file (remote/), loaded with
trust_remote_code=True. The tokenizer goes out as it is, as a PreTrainedTokenizerFast over
tokenizer.json (character tokenizers too)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .. import crystal
from ..fileio import atomic_write_text
from ..model import Model
from ..tokenizer import tokenizer_to_json
from .common import END_OF_TEXT, InteropError, end_of_text_id, hf_name
from .hf_import import LAYER_NORM_EPS
from .tensorfile import write_safetensors

REMOTE_FILES = ("configuration_cllm.py", "modeling_cllm.py")
# modeling_cllm.py imports cllm's own crystal.py, copied beside it under this name
CRYSTAL_FILE = "crystal.py"


def is_gpt2(config) -> bool:
    return config.position == "learned" and config.attention == "dense"


def export_hf(model: Model, folder: str | Path) -> list[Path]:
    """Write the folder (created if needed); return the files written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InteropError(f"{folder}: a file; give a folder for the Hugging Face model")
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    eot = end_of_text_id(model.tokenizer)
    written = []

    def write(name: str, text: str) -> None:
        atomic_write_text(folder / name, text)
        written.append(folder / name)

    write_safetensors(folder / "model.safetensors",
                      [(hf_name(name), model.params[name]) for name, _ in config.tensor_shapes()],
                      metadata={"format": "pt"})   # transformers refuses files without it
    written.append(folder / "model.safetensors")
    write("config.json", _json(hf_config(config, eot)))
    write("generation_config.json", _json({"bos_token_id": eot, "eos_token_id": eot}))
    if model.tokenizer is not None:
        write("tokenizer.json", tokenizer_to_json(model.tokenizer))
        write("tokenizer_config.json", _json(tokenizer_config(model.tokenizer, config.n_ctx)))
    if not is_gpt2(config):
        remote = resources.files(__package__) / "remote"
        for name in REMOTE_FILES:
            write(name, (remote / name).read_text(encoding="utf-8"))
        write(CRYSTAL_FILE, Path(crystal.__file__).read_text(encoding="utf-8"))
    return written


def hf_config(config, eot: int | None) -> dict:
    """config.json: GPT2LMHeadModel's, or the crystalline model's with its auto_map."""
    sizes = dict(vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd,
                 n_layer=config.n_layer, n_head=config.n_head, n_inner=config.n_inner,
                 layer_norm_epsilon=LAYER_NORM_EPS, tie_word_embeddings=config.tie_embeddings,
                 # null rather than GPT2Config's default 50256, a token most cllm models lack
                 bos_token_id=eot, eos_token_id=eot, torch_dtype="float32")
    if is_gpt2(config):
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", **sizes,
                    activation_function="gelu_new", scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    # cllm trains without dropout
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=True)
    stem = [name.removesuffix(".py") for name in REMOTE_FILES]
    return dict(architectures=["CllmForCausalLM"], model_type="cllm",
                auto_map={"AutoConfig": f"{stem[0]}.CllmConfig",
                          "AutoModelForCausalLM": f"{stem[1]}.CllmForCausalLM"},
                **sizes, position=config.position, attention=config.attention,
                ulam_radius=config.ulam_radius)


def tokenizer_config(tokenizer, n_ctx: int) -> dict:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json, which keeps every
    step of ours (a GPT2TokenizerFast would impose GPT-2's own)."""
    fields = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": n_ctx,
              # decode exactly as cllm does: no spaces removed before punctuation
              "clean_up_tokenization_spaces": False}
    if tokenizer.token_to_id(END_OF_TEXT) is not None:
        fields.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    return fields


def _json(value) -> str:
    return json.dumps(value, indent=2) + "\n"
