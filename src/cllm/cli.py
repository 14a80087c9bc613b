"""The `cllm` command: train, infer, create, quantize, import, export and help.

Argument errors print one line and exit with 2. Errors in what the user gave (files, data,
values) print `error: <message>` and exit with 1; Ctrl-C exits with 130. None shows a traceback:
anything unforeseen that escapes is reported the same way, in one line, and its traceback is
printed only when the environment sets CLLM_TRACEBACK=1 (for bug reports).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path

from . import __version__
from .architecture import (DERIVED_IN_TRAINING, add_architecture_arguments,
                           check_architecture, chosen_architecture)
from .argtypes import non_negative_float, non_negative_int, positive_int, probability, text
from .config import ModelConfig
from .errors import CllmError, Stopped, UnverifiedFile
from .interop.commands import add_export_arguments, add_import_arguments, run_export, run_import
from .quantize import FORMATS as QUANTIZED_FORMATS
from .settings import DEFAULT_SEED, TrainConfig, add_arguments, check_agrees

COMMANDS = ("train", "infer", "create", "quantize", "import", "export", "help")
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cllm", description="Crystalline Lattice Language Model: train and "
                     "run GPT-2 style language models on CPUs.")
    parser.add_argument("--version", action="version", version=f"cllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_train(commands.add_parser("train", help="train a model on a folder of text",
                                   description="Train a model on every text file under a "
                                   "folder, in six phases, with checkpoints to resume from."))
    _add_infer(commands.add_parser("infer", help="generate text with a model",
                                   description="Generate text with a .cllm model, for one "
                                   "prompt, for a file of prompts or interactively."))
    _add_create(commands.add_parser("create", help="create an untrained model file",
                                    description="Create a .cllm model with freshly "
                                    "initialised weights, to train with cllm train --init-from."))
    _add_quantize(commands.add_parser(
        "quantize", help="quantize a model's weights to int8 or bf16 for generation",
        description="Write a copy of a float32 .cllm model whose matrices are int8 (blocks of "
                    "32 weights sharing a scale, a quarter of the size) or bf16 (half the "
                    "size), for cllm infer; it cannot be trained."))
    add_import_arguments(commands.add_parser(
        "import", help="import a Hugging Face GPT-2 model",
        description="Import a Hugging Face GPT-2 checkpoint (a folder, or a model of the local "
                    "Hugging Face cache) as a .cllm model with its tokenizer."))
    add_export_arguments(commands.add_parser(
        "export", help="export a model for transformers or llama.cpp",
        description="Export a .cllm model as a Hugging Face folder (transformers) or a GGUF "
                    "file (llama.cpp)."))
    help_parser = commands.add_parser("help", help="show the help of cllm or of a command",
                                      description="Show the help of cllm or of a command.")
    help_parser.add_argument("topic", nargs="?", choices=COMMANDS[:-1],
                             help="the command to explain")
    return parser


def _add_train(p: argparse.ArgumentParser) -> None:
    add_architecture_arguments(p, skip=DERIVED_IN_TRAINING)
    add_arguments(p.add_argument_group("training"), TrainConfig)


def _add_infer(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="FILE", help="the .cllm model")
    p.add_argument("-p", "--prompt", type=text, help="text to continue")
    p.add_argument("-n", "--tokens", type=non_negative_int, default=50, metavar="N",
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("-t", "--temperature", type=non_negative_float, default=0.8, metavar="T",
                   help="sampling temperature, 0 for the most likely token "
                        "(default: %(default)s)")
    p.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample among the K most likely tokens only")
    p.add_argument("--top-p", type=probability, metavar="P",
                   help="sample among the most likely tokens that make up probability P")
    p.add_argument("--seed", type=non_negative_int, help="seed: the same seed, the same text")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="threads (default: the usable cores that are idle, by the load "
                        "average; the text does not depend on it)")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the text to FILE")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="read prompts line by line (after -p, if given) until 'quit' or the "
                        "end of input")
    p.add_argument("--prompts", metavar="FILE",
                   help="a UTF-8 file of prompts, one a line (blank lines skipped), generated "
                        "together; goes without -p and -i")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", required=True, metavar="FILE",
                   help="the float32 .cllm model")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the quantized model file to write")
    p.add_argument("--to", required=True, choices=QUANTIZED_FORMATS,
                   help="int8: 8-bit weights in blocks of 32 with a float32 scale; bf16: "
                        "bfloat16 weights")


def _add_create(p: argparse.ArgumentParser) -> None:
    add_architecture_arguments(p, vocab_size="vocabulary size; taken from --tokenizer when given")
    p.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json to put in the model")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULT_SEED,
                   help="seed of the initial weights (default: %(default)s)")
    p.add_argument("-o", "--output", default="model.cllm", metavar="FILE",
                   help="the model file to write (default: %(default)s)")


def explicit_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags given in argv, as opposed to left at their defaults."""
    parser = build_parser()
    for action in _all_actions(parser):
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def _create(args: argparse.Namespace, explicit: set[str]) -> None:
    from .model import Model
    from .tokenizer import tokenizer_from_json

    fields = chosen_architecture(args)
    check_architecture(fields)
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = tokenizer_from_json(Path(args.tokenizer).read_text(encoding="utf-8"))
        check_agrees(ModelConfig, fields, explicit, {"vocab_size": tokenizer.get_vocab_size()},
                     args.tokenizer)
        fields["vocab_size"] = tokenizer.get_vocab_size()
    model = Model.create(ModelConfig(**fields), seed=args.seed, tokenizer=tokenizer)
    model.save(args.output)
    print(f"{args.output}: {model.config.describe()}")
    print(f"train it with: cllm train --init-from {args.output} -d DIR")


def _quantize(args: argparse.Namespace) -> None:
    from .checkpoint import load_float32_cllm, save_cllm
    from .quantize import quantize_tensors
    from .tokenizer import checked_tokenizer, tokenizer_to_json

    source, output = Path(args.model), Path(args.output)
    if _same_file(source, output):
        raise CllmError(f"-o {output} is the model itself: write the quantized model to "
                        f"another file, keeping the float32 one (training needs it)")
    float_file = load_float32_cllm(source, "quantize")
    config = float_file.config
    tokenizer_json = None if float_file.tokenizer_json is None else tokenizer_to_json(
        checked_tokenizer(float_file.tokenizer_json, config.vocab_size, str(source)))
    save_cllm(output, quantize_tensors(config, float_file.params, args.to), config,
              tokenizer_json, weights=args.to)
    print(f"wrote {output}: {args.to} weights, {output.stat().st_size / 1e6:.2f} MB (the "
          f"float32 {source}: {source.stat().st_size / 1e6:.2f} MB)")
    print(f"generate with: cllm infer -m {shlex.quote(str(output))} -p \"Once upon a time\"")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file, through links too."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): two files
        return False


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    if args.command is None:
        parser.error(f"give a command: one of {', '.join(COMMANDS)}")
    if args.command == "help":
        target = parser if args.topic is None else _subparser(parser, args.topic)
        target.print_help()
    elif args.command == "train":
        from .train import train
        train(args, explicit_flags(argv), argv)
    elif args.command == "infer":
        if args.prompts is not None and (args.prompt is not None or args.interactive):
            _subparser(parser, "infer").error("--prompts gives every prompt: it goes without "
                                              "-p/--prompt and -i/--interactive")
        if args.prompt is None and not args.interactive and args.prompts is None:
            _subparser(parser, "infer").error("give a prompt with -p/--prompt, or -i for "
                                              "interactive mode, or a file of prompts with "
                                              "--prompts")
        from .infer import infer
        infer(args)
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "import":
        run_import(args)
    elif args.command == "export":
        run_export(args)
    else:
        _create(args, explicit_flags(argv))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions
                if isinstance(a, argparse._SubParsersAction)).choices[name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_notice
        code = _run_reporting(parser, args, argv)
    if code != 0 and args.command == "train":
        from .parallel import end_job_after_failure
        end_job_after_failure(code)
    return code


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, UnverifiedFile):
        print(f"notice: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line),
              file=sys.stderr, end="")


def _run_reporting(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   argv: list[str]) -> int:
    """Run the command; report every way it can fail in one line and an exit code."""
    try:
        _run(parser, args, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except Stopped as e:
        return 128 + e.signum
    except BrokenPipeError:
        # whatever read the output stopped (`cllm infer ... | head -1`): end quietly, and keep
        # Python from failing again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CllmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {_describe_os_error(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # the last line of defence: one line, never a traceback
        if os.environ.get("CLLM_TRACEBACK") == "1":
            traceback.print_exc()
        text = " ".join(str(e).split()) or "no message"
        print(f"error: {type(e).__name__}: {text} (set CLLM_TRACEBACK=1 to see where)",
              file=sys.stderr)
        return 1
    return 0


def _describe_os_error(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
