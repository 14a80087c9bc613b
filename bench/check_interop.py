"""Check `cllm import` and `cllm export` against the programs on the other side.

1. Import: a random GPT2LMHeadModel saved by transformers (save_pretrained, safetensors) with
   a byte-level BPE tokenizer, imported by `cllm import`: cllm's logits equal transformers'
   (1e-4 relative) and greedy generation gives the same tokens; exported back to hf, every
   tensor is bitwise the one transformers saved.
2. Export to hf: models with every combination of the four crystalline switches (init,
   position, attention, loss), with BPE and character tokenizers, loaded by transformers
   (AutoModelForCausalLM, trust_remote_code for angular positions or Ulam attention, and
   AutoTokenizer): logits, greedy tokens and token ids equal cllm's.
3. Export to GGUF, when llama-cpp-python is installed: llama.cpp, in its own process, reads
   the file and generates greedily; its tokens (and its tokenization of the prompt) must be
   cllm's. Skipped, and said so, without it.

Needs `pip install torch==2.13.0 transformers` (and llama-cpp-python for 3). Exits non-zero on
any disagreement. Run from the repository root: python bench/check_interop.py [--gpt2-small]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine_line, thread_env  # noqa: E402

TOLERANCE = 1e-4        # worst logit error relative to the largest logit
PROMPT = "To be, or not to be, that is the question:"
NEW_TOKENS = 24
SWITCHES = dict(init=("normal", "lattice"), position=("learned", "angular"),
                attention=("dense", "ulam"), loss=("ce", "crystalline"))


def texts() -> list[str]:
    shakespeare = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        return [shakespeare.read_text(encoding="utf-8")[:300_000]]
    return [p.read_text(encoding="utf-8") for p in sorted((REPO / "src" / "cllm").glob("*.py"))]


def cli(*argv) -> str:
    """Run `cllm argv` in this process; its standard output (it must succeed)."""
    from cllm.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"cllm {' '.join(map(str, argv))} failed with exit code {code}")
    return out.getvalue()


def relative_error(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def hf_logits(model, idx) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(idx)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    import torch
    ids = torch.as_tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def compare(name: str, cllm_model, hf_model, tokenizer=None) -> bool:
    """Logits on random ids over the whole context, and greedy generation from the prompt."""
    from cllm.tokenizer import encode
    config = cllm_model.config
    idx = np.random.default_rng(0).integers(0, config.vocab_size, (2, config.n_ctx))
    error = relative_error(cllm_model.forward(idx), hf_logits(hf_model, idx))
    prompt = encode(cllm_model.tokenizer, PROMPT)[:config.n_ctx // 2]
    new = min(NEW_TOKENS, config.n_ctx - len(prompt))   # transformers cannot slide the window
    ours = cllm_model.generate_ids(prompt, new, temperature=0)
    theirs = hf_greedy(hf_model, prompt, new)
    same_ids = True
    if tokenizer is not None:
        same_ids = tokenizer(PROMPT)["input_ids"] == encode(cllm_model.tokenizer, PROMPT) \
            and tokenizer.decode(ours) == cllm_model.tokenizer.decode(ours)
    ok = error <= TOLERANCE and ours == theirs and same_ids
    print(f"  {name:58s} logits {error:.1e}  greedy {'same' if ours == theirs else 'DIFFERENT'}"
          + ("" if tokenizer is None else f"  tokenizer {'same' if same_ids else 'DIFFERENT'}")
          + f"  {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def scaled(model, scale: float):
    """Weights drawn wider than GPT-2's 0.02, so that logits are far apart and a greedy tie
    between the two sides is vanishingly unlikely; LayerNorm weights stay 1."""
    for name, view in model.params.items():
        if view.ndim == 2:
            view *= scale
    return model


def check_import(work: Path, sizes: dict, bpe) -> bool:
    import torch
    from safetensors.numpy import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from cllm import Model
    print("import: a random GPT2LMHeadModel saved by transformers", flush=True)
    ok = True
    for tied in (True, False):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=sizes["vocab_size"], n_positions=sizes["n_ctx"],
                            n_embd=sizes["n_embd"], n_layer=sizes["n_layer"],
                            n_head=sizes["n_head"], tie_word_embeddings=tied,
                            bos_token_id=None, eos_token_id=None)
        hf = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            # wider than GPT-2's 0.02 (logits far apart: no greedy near-ties), and narrow
            # enough at every width that activations stay of order one (no chaos that float32
            # rounding could tip)
            for p in hf.parameters():
                if p.ndim == 2:
                    p.normal_(0, sizes["n_embd"] ** -0.5)
        folder = work / f"gpt2-{'tied' if tied else 'untied'}"
        hf.save_pretrained(folder)
        bpe.save(str(folder / "tokenizer.json"))
        cli("import", folder, "-o", folder / "m.cllm")
        model = Model.load(folder / "m.cllm")
        ok &= compare(f"tied={tied}: cllm import vs GPT2LMHeadModel", model, hf)
        cli("export", "-m", folder / "m.cllm", "--to", "hf", folder / "back")
        source = load_file(folder / "model.safetensors")
        back = load_file(folder / "back" / "model.safetensors")
        same = set(back) <= set(source) and all(
            back[name].tobytes() == source[name].tobytes() for name in back)
        print(f"  {'tied=' + str(tied) + ': import then export, tensors bitwise':58s} "
              f"{'same' if same else 'DIFFERENT'} ({len(back)} tensors)", flush=True)
        ok &= same
    return ok


def check_export_hf(work: Path, sizes: dict, bpe, char) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from cllm import Model, ModelConfig
    from cllm.interop.hf_export import is_gpt2
    print("export to hf: every switch combination, loaded by transformers", flush=True)
    ok = True
    for n, values in enumerate(itertools.product(*SWITCHES.values())):
        switches = dict(zip(SWITCHES, values))
        # the tokenizer and the tying vary with no switch in step
        tokenizer = (bpe, char)[(n >> 1 ^ n >> 2) & 1]
        config = ModelConfig(**{**sizes, "vocab_size": tokenizer.get_vocab_size()}, **switches,
                             tie_embeddings=bin(n).count("1") % 2 == 0)
        folder = work / f"hf-{n}"
        folder.mkdir()
        scaled(Model.create(config, seed=n, tokenizer=tokenizer), 10).save(folder / "m.cllm")
        cli("export", "-m", folder / "m.cllm", "--to", "hf", folder / "hf")
        remote = not is_gpt2(config)
        hf = AutoModelForCausalLM.from_pretrained(folder / "hf", trust_remote_code=remote).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(folder / "hf", trust_remote_code=remote)
        label = (" ".join(f"{v}" for v in values) + f" tied={config.tie_embeddings} "
                 f"{'bpe' if tokenizer is bpe else 'char'} -> {type(hf).__name__}")
        ok &= compare(label, Model.load(folder / "m.cllm"), hf, hf_tokenizer)
    return ok


LLAMA_WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
# logits_all: without it this llama-cpp-python leaves `scores` unset after eval
llm = Llama(model_path=path, n_ctx=0, n_threads=2, logits_all=True, verbose=False)
ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=False)
out = []
llm.reset()
llm.eval(ids)
for _ in range(new):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out.append(token)
    llm.eval([token])
print(json.dumps({"prompt": ids, "greedy": out}))
"""


def check_gguf(work: Path, sizes: dict, bpe, char) -> bool | None:
    from cllm import Model, ModelConfig
    from cllm.config import GPT2_SWITCHES
    from cllm.tokenizer import encode
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("export to gguf: SKIPPED, llama-cpp-python is not installed "
              "(pip install llama-cpp-python builds llama.cpp, about 10 minutes on 2 cores)")
        return None
    print("export to gguf: llama.cpp generates greedily from the file", flush=True)
    ok = True
    for n, (tokenizer, type_name) in enumerate(itertools.product((bpe, char),
                                                                 ("f32", "f16", "q8_0"))):
        config = ModelConfig(**{**sizes, "vocab_size": tokenizer.get_vocab_size()},
                             **GPT2_SWITCHES, tie_embeddings=n % 2 == 0)
        folder = work / f"gguf-{n}"
        model = scaled(Model.create(config, seed=n, tokenizer=tokenizer), 10)
        folder.mkdir()
        model.save(folder / "m.cllm")
        cli("export", "-m", folder / "m.cllm", "--to", "gguf", folder / "m.gguf", "--type",
            type_name)
        prompt = encode(tokenizer, PROMPT)
        new = min(NEW_TOKENS, config.n_ctx - len(prompt))
        result = subprocess.run([sys.executable, "-c", LLAMA_WORKER, str(folder / "m.gguf"),
                                 PROMPT, str(new)], env=thread_env(2), capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            print(f"  llama.cpp failed on {folder / 'm.gguf'}:\n{result.stderr[-2000:]}")
            ok = False
            continue
        theirs = json.loads(result.stdout.strip().splitlines()[-1])
        ours = model.generate_ids(prompt, new, temperature=0)
        # quantized weights round the logits: greedy tokens may part after a near tie
        exact = type_name == "f32"
        same_prompt, same = theirs["prompt"] == prompt, theirs["greedy"] == ours
        agree = sum(a == b for a, b in zip(theirs["greedy"], ours))
        good = same_prompt and (same if exact else agree >= new // 2)
        print(f"  {'bpe' if tokenizer is bpe else 'char'} {type_name:5s} "
              f"tied={config.tie_embeddings!s:5s} prompt ids "
              f"{'same' if same_prompt else 'DIFFERENT'}, greedy {agree}/{new} the same  "
              f"{'ok' if good else 'FAIL'}", flush=True)
        ok &= good
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2-small", action="store_true",
                    help="GPT-2 small's sizes (V=50257, n_ctx=1024, C=768, L=12, H=12) for the "
                         "import check instead of a small model")
    args = ap.parse_args()
    # before huggingface_hub is imported: no progress bar per saved or loaded model
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging
    from cllm.tokenizer import train_bpe, train_char
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    corpus = texts()
    bpe, char = train_bpe(corpus, 1000), train_char(corpus)
    sizes = dict(vocab_size=50257, n_ctx=1024, n_embd=768, n_layer=12, n_head=12) \
        if args.gpt2_small else dict(vocab_size=1000, n_ctx=64, n_embd=64, n_layer=2, n_head=4)
    small = dict(n_ctx=64, n_embd=32, n_layer=2, n_head=4)
    print(f"check_interop: {machine_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [check_import(work, sizes, bpe), check_export_hf(work, small, bpe, char),
                   check_gguf(work, small, bpe, char)]
    failed = [r for r in results if r is False]
    print("all agree" if not failed else "DISAGREEMENT")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
