"""`cllm infer`: text from a .cllm model, for one prompt, for a file of prompts generated
together, or as a conversation."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .checkpoint import all_finite
from .errors import CllmError, DataError
from .fileio import atomic_write_text
from .model import Model
from .tokenizer import decode, encode

QUIT = "quit"


def infer(args: argparse.Namespace) -> None:
    if args.output is not None:
        check_writable(Path(args.output))
    prompts = None if args.prompts is None else _read_prompts(Path(args.prompts))
    # An interactive session copies the weights: a long-lived mapping of a file that another
    # program rewrites in place would end the session with SIGBUS.
    model = Model.load(args.model, writable=args.interactive)
    if not all_finite(model.flat):
        raise CllmError(f"{args.model}: damaged model file (its weights hold values that are "
                        f"not finite, NaN or infinity)")
    if model.tokenizer is None:
        raise CllmError(f"{args.model} has no tokenizer, so it cannot read a text prompt "
                        f"(create it with --tokenizer FILE, or train it with cllm train)")
    sampling = dict(max_new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, threads=args.threads)
    transcript = ""
    # weights large enough to overflow float32 make NaN logits: one error line (sampling's
    # ValueError), not numpy's warnings besides
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if prompts is not None:
            transcript = _generate_batch(model, args.prompts, prompts, args.seed, sampling)
        if args.prompt is not None:
            print(args.prompt, end="", flush=True)
            try:
                transcript = args.prompt + _print_stream(model.stream(
                    args.prompt, seed=args.seed, **sampling))
            except ValueError as e:
                print(flush=True)
                raise CllmError(f"{args.model}: cannot generate from the prompt: {e}") from e
        if args.interactive:
            transcript = converse(model, transcript, args.seed, sampling)
    if args.output is not None:
        atomic_write_text(args.output, transcript)


def _read_prompts(path: Path) -> list[tuple[int, str]]:
    """The prompts of a file, one a line: (line number, text) of each line that is not blank."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the prompts file is not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from e
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    prompts = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DataError(f"{path}: the prompts file holds no prompt (one a line; blank lines "
                        f"are skipped)")
    return prompts


def _generate_batch(model: Model, path: str, prompts: list[tuple[int, str]], seed: int | None,
                    sampling: dict) -> str:
    """Generate after every prompt together, print each prompt with its text under a line
    naming it, and return what was printed."""
    for number, prompt in prompts:
        try:
            encode(model.tokenizer, prompt)
        except DataError as e:  # say which prompt, before generating any
            raise DataError(f"{path}, line {number}: {e}") from e
    try:
        texts = model.generate([prompt for _, prompt in prompts], seed=seed, **sampling)
    except ValueError as e:
        raise CllmError(f"{path}: cannot generate from the prompts: {e}") from e
    printed = "".join(f"--- prompt {i} ---\n{prompt}{text}\n"
                      for i, ((_, prompt), text) in enumerate(zip(prompts, texts), 1))
    print(printed, end="", flush=True)
    return printed


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be written before spending time generating it."""
    folder = path.parent
    if path.is_dir():
        raise CllmError(f"{path}: the output file is a folder")
    if not folder.is_dir():
        raise CllmError(f"{path}: cannot write the output file: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CllmError(f"{path}: cannot write the output file: permission denied")


def converse(model: Model, transcript: str, seed: int | None, sampling: dict) -> str:
    """Answer prompts read line by line until `quit` or the end of input. Each answer
    continues the conversation so far, cut from the front to leave room for the answer
    within the model's context. Returns the transcript."""
    terminal = sys.stdin.isatty()
    if terminal:
        import readline  # noqa: F401  (gives input() line editing and history)
    budget = max(1, model.config.n_ctx - sampling["max_new_tokens"])
    turn = 0
    for line in _input_lines(terminal):
        if line.strip() == QUIT:
            break
        if not line.strip():
            continue
        try:
            context = _last_tokens(model, transcript + line, budget)
            answer = _print_stream(model.stream(
                context, seed=None if seed is None else seed + turn, **sampling))
        except (CllmError, ValueError) as e:  # one bad prompt does not end the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        transcript += line + answer
        turn += 1
    return transcript


def _input_lines(terminal: bool):
    """The lines of standard input, each decoded on its own: a line that is not UTF-8 costs
    that line (with an error message), not the session. A standard input that is text without
    bytes beneath (io.StringIO, as tests and embedding programs give) is read as text."""
    buffer = getattr(sys.stdin, "buffer", None)
    while True:
        try:
            if terminal:
                yield input("> ")
                continue
            if buffer is None:
                line = sys.stdin.readline()
                if not line:
                    return
                yield line.rstrip("\r\n")
                continue
            raw = buffer.readline()
            if not raw:
                return
            yield raw.decode("utf-8").rstrip("\r\n")
        except EOFError:
            return
        except UnicodeDecodeError as e:
            print(f"error: the input line is not UTF-8 text ({e.reason} at byte {e.start}); "
                  f"it was skipped", file=sys.stderr, flush=True)


def _last_tokens(model: Model, text: str, budget: int) -> str:
    ids = encode(model.tokenizer, text)
    return text if len(ids) <= budget else decode(model.tokenizer, ids[-budget:])


def _print_stream(pieces) -> str:
    """Print text pieces as they arrive, then a newline; return the text with it."""
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print(flush=True)
    return text + "\n"
