"""The `cllm import` and `cllm export` commands: their flags and what they print. The work is
done in hf_import, hf_export and gguf_export, imported only when a command runs."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import CllmError
from .common import GGUF_TYPES

FORMATS = ("hf", "gguf")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="a Hugging Face GPT-2 folder (config.json, model.safetensors, "
                        "tokenizer.json or vocab.json + merges.txt), or a model name of the "
                        "local Hugging Face cache such as gpt2 or distilgpt2")
    p.add_argument("-o", "--output", default="model.cllm", metavar="FILE",
                   help="the model file to write (default: %(default)s)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="FILE", help="the .cllm model")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="hf: a folder for transformers (AutoModelForCausalLM); gguf: a file "
                        "for llama.cpp")
    p.add_argument("output", metavar="OUTPUT", help="the folder (hf) or file (gguf) to write")
    p.add_argument("--type", choices=GGUF_TYPES,
                   help="gguf: type of the matrices and token embeddings (default: f32)")


def run_import(args: argparse.Namespace) -> None:
    from .hf_import import import_model

    model, folder = import_model(args.source)
    model.save(args.output)
    out = shlex.quote(args.output)
    print(f"{args.source} ({folder}): {model.config.describe()}; tokenizer of "
          f"{model.tokenizer.get_vocab_size()} tokens")
    print(f"wrote {args.output}")
    print(f"generate with: cllm infer -m {out} -p \"Once upon a time\"")
    print(f"fine-tune with: cllm train --init-from {out} -d DIR -c RUN")


def run_export(args: argparse.Namespace) -> None:
    from ..checkpoint import load_float32_cllm
    from ..model import Model

    if args.to == "hf" and args.type is not None:
        raise CllmError("--type chooses the tensor type of a GGUF file: it applies to "
                        "--to gguf only")
    model = Model.from_file(load_float32_cllm(args.model, "export"), args.model)
    out = shlex.quote(args.output)
    if args.to == "hf":
        from .hf_export import REMOTE_FILES, export_hf, is_gpt2
        written = export_hf(model, args.output)
        kind = "GPT2LMHeadModel" if is_gpt2(model.config) else \
            f"the crystalline model, with its own {REMOTE_FILES[1]}"
        print(f"wrote {args.output}: {', '.join(p.name for p in written)} ({kind})")
        remote = "" if is_gpt2(model.config) else ", trust_remote_code=True"
        tokenizer = f"; tokenizer = AutoTokenizer.from_pretrained({args.output!r}{remote})" \
            if model.tokenizer is not None else " (the model has no tokenizer to go with it)"
        print(f"load it with: from transformers import AutoModelForCausalLM, AutoTokenizer; "
              f"model = AutoModelForCausalLM.from_pretrained({args.output!r}{remote})"
              f"{tokenizer}")
        return
    from .gguf_export import export_gguf
    summary = export_gguf(model, args.output, args.type or "f32", name=Path(args.model).stem)
    print(f"wrote {args.output}: llama.cpp gpt2, {args.type or 'f32'}, {summary.tensors} "
          f"tensors, {summary.bytes / 1e6:.1f} MB of weights")
    ignore_eos = ""
    if summary.end_of_text is None:
        print("  the tokenizer has no end-of-text token, and llama.cpp then stops at token 11 "
              "(its default for gpt2 tokenizers): run it with --ignore-eos")
        ignore_eos = " --ignore-eos"
    print(f"run it with: llama-cli -m {out} -p \"Once upon a time\" -n 50{ignore_eos}")
