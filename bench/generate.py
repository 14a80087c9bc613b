"""Generation speed of the seed configuration: cllm (float32, bf16 and int8 weights) against
Hugging Face `generate` (PyTorch) and llama.cpp (F32, F16 and Q8_0 GGUF exports), all with the
same weights (Model.create(seed=0)), each system in its own process.

1. Decode: batch 1, a 16-token prompt, --tokens greedy new tokens: tokens/s, and the GB/s of
   weights that rate reads (weight_bytes_per_token).
2. Batch: --batch different 16-token prompts decoded together: total new tokens/s (llama.cpp
   through its llama_batch API, see llama_batch_generate).
3. Time to first token (TTFT) after a 200-token prompt: from handing over the prompt to having
   the first new token; for cllm also the prompt read token by token (decoder.step per
   position), against its batched prefill.
4. Peak RSS of a one-shot `cllm infer` on a float32 file and on its int8 file.
5. Greedy agreement: cllm float32 against Hugging Face (equal) and llama.cpp F32, and the share
   of the bf16, int8, F16 and Q8_0 ids equal to float32's.

Each time is the best of 3 timed calls, after an untimed warm-up call. The report (a Markdown
table and notes) goes to standard output and to bench/out/generate.md.

    python bench/generate.py [--threads T] [--tokens 200] [--batch 8] [--no-torch] [--no-llama]
                             [--only cllm,hf,llama,infer | names such as cllm-int8,llama-q8_0]
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import string
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

# Nothing imports cllm (nor common, which does) at module level: the llama.cpp worker runs this
# file too, and cllm's OpenMP runtime conflicts with llama.cpp's in one process.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT_TOKENS = 16
LONG_PROMPT_TOKENS = 200
REPEATS = 3
CLLM_FORMATS = ("float32", "bf16", "int8")
GGUF_TYPES = ("f32", "f16", "q8_0")
SYSTEMS = (tuple(f"cllm-{f}" for f in CLLM_FORMATS) + ("hf",)
           + tuple(f"llama-{t}" for t in GGUF_TYPES) + ("infer",))
# Bytes per weight of the matrices a format quantizes; int8 and Q8_0 keep one 2-byte scale per
# block of 32 weights.
MATRIX_BYTES = {"float32": 4, "bf16": 2, "int8": 34 / 32, "f32": 4, "f16": 2, "q8_0": 34 / 32}
LLAMA_INSTALL = ('CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
                 '-DGGML_F16C=ON" pip install --no-cache-dir llama-cpp-python (on Intel AVX-512 '
                 'machines add -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF)')
def weight_bytes_per_token(config, fmt: str) -> float:
    """Bytes of weights the decoder reads to produce one token (a batch, one token per sequence,
    reads them once): the matrices of the layers and the head (the whole of wte when tied) at
    MATRIX_BYTES[fmt] per weight, and at 4 bytes the LayerNorm weights, the biases and the one
    row of wte and of wpe that embed the token and its position. fmt is a cllm weight format or
    a GGUF type, whose files hold the same tensors (llama.cpp's token embedding row is in the
    file's type, a difference of under 1 KB)."""
    total = 0.0
    for name, shape in config.tensor_shapes():
        if name in ("wte", "wpe"):
            total += 4 * shape[1]
            if name == "wte" and config.tie_embeddings:
                total += MATRIX_BYTES[fmt] * math.prod(shape)
        elif len(shape) == 2:
            total += MATRIX_BYTES[fmt] * math.prod(shape)
        else:
            total += 4 * shape[0]
    return total


def prompts(vocab_size: int, batch: int) -> tuple[list[int], list[list[int]], list[int]]:
    """What every system is given: the batch-1 prompt, `batch` prompts (the first of them the
    batch-1 prompt) and the long prompt of the time to first token."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, vocab_size, (batch, PROMPT_TOKENS)).tolist()
    return rows[0], rows, rng.integers(0, vocab_size, LONG_PROMPT_TOKENS).tolist()


def best(fn, repeats: int = REPEATS):
    """(the shortest wall time of `repeats` calls of fn, after an untimed warm-up call; the
    result of the last call)."""
    result = fn()
    shortest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        shortest = min(shortest, time.perf_counter() - start)
    return shortest, result


# ---- the workers: one process each, printing one JSON line ----

def cllm_worker(args) -> dict:
    """cllm with args.format weights: the seed model, quantized unless float32."""
    from cllm import Model, ModelConfig
    from common import SEED_CONFIG
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0)
    if args.format != "float32":
        model = model.quantized(args.format)
    assert model.weight_format == args.format, model.weight_format
    threads = args.threads
    short, rows, long = prompts(model.config.vocab_size, args.batch)

    def generate(ids, new_tokens):
        return lambda: model.generate_ids(ids, new_tokens, temperature=0, threads=threads)

    def token_by_token():
        decoder = model.core.decoder(threads)
        for pos, token in enumerate(long):
            logits = decoder.step(token, pos)
        return [int(np.argmax(logits))]

    result = {}
    result["decode_s"], result["ids"] = best(generate(short, args.tokens))
    if args.batch > 1:
        result["batch_s"], result["batch_ids"] = best(generate(rows, args.tokens))
    result["ttft_s"], first = best(generate(long, 1))
    result["stepwise_s"], first_stepwise = best(token_by_token)
    result["same_first"] = first == first_stepwise
    return result


def hf_worker(args) -> dict:
    """Hugging Face GPT2LMHeadModel (float32, KV cache, greedy) holding the seed model's
    weights."""
    import torch
    import transformers
    from cllm import Model, ModelConfig
    from common import SEED_CONFIG
    from hf_gpt2 import greedy_generate, hf_model
    config = ModelConfig(**SEED_CONFIG)
    model = hf_model(config, Model.create(config, seed=0).params)
    torch.set_num_threads(args.threads)
    short, rows, long = prompts(config.vocab_size, args.batch)

    def generate(batch, new_tokens):
        return lambda: greedy_generate(model, batch, new_tokens)

    result = dict(version=f"transformers {transformers.__version__}, PyTorch "
                          f"{torch.__version__.split('+')[0]}")
    result["decode_s"], (result["ids"],) = best(generate([short], args.tokens))
    if args.batch > 1:
        result["batch_s"], result["batch_ids"] = best(generate(rows, args.tokens))
    result["ttft_s"], _ = best(generate([long], 1))
    return result


def llama_worker(args) -> dict:
    """llama.cpp on the GGUF file args.gguf. This process must not import cllm.

    Greedy decoding is llm.eval of the prompt, then of each new token, taking the argmax of the
    last position's logits. Without logits_all, Llama.eval keeps no `scores`, so the logits are
    read with llama_get_logits_ith(ctx, -1). The worker also checks that llama-cpp-python's own
    greedy sampler (generate with temp=0) gives the same ids."""
    import llama_cpp
    threads = args.threads
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=256, n_threads=threads,
                          n_threads_batch=threads, n_batch=256, verbose=False, logits_all=False)
    V = llm.n_vocab()
    short, rows, long = prompts(V, args.batch)

    def argmax_last() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(V,))))

    def generate(ids, new_tokens):
        def run():
            llm.reset()
            llm.eval(ids)
            new = [argmax_last()]
            while len(new) < new_tokens:
                llm.eval(new[-1:])
                new.append(argmax_last())
            return new
        return run

    result = dict(version=f"llama-cpp-python {llama_cpp.__version__}")
    result["decode_s"], result["ids"] = best(generate(short, args.tokens))
    if args.batch > 1:
        result["batch_s"], result["batch_ids"] = best(
            lambda: llama_batch_generate(llama_cpp, llm, rows, args.tokens, threads))
    result["ttft_s"], _ = best(generate(long, 1))
    llm.reset()
    sampled = llm.generate(short, temp=0.0, repeat_penalty=1.0)
    result["sampler_same"] = list(itertools.islice(sampled, args.tokens)) == result["ids"]
    return result


def llama_batch_generate(llama_cpp, llm, rows: list[list[int]], new_tokens: int,
                         threads: int) -> list[list[int]]:
    """Greedy decoding of several prompts together in llama.cpp, as its batched examples do:
    a context with one sequence per prompt (n_seq_max, each n_ctx = 256 positions), every
    prompt's tokens in one llama_batch (logits for each prompt's last token), then one batch a
    step holding the new token of every sequence. llama-cpp-python's Llama decodes one
    sequence at a time, so this goes through its low-level API on the same loaded model."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 256 * len(rows)
    params.n_batch = params.n_ubatch = max(sum(map(len, rows)), len(rows))
    params.n_seq_max = len(rows)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    V = llm.n_vocab()
    try:
        def decode(entries):
            """entries (token, position, sequence, wants logits) -> the batch indices of the
            logits"""
            for i, (token, pos, seq, wanted) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, wanted
            batch.n_tokens = len(entries)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return [i for i, entry in enumerate(entries) if entry[3]]

        outputs = decode([(t, p, s, p == len(row) - 1)
                          for s, row in enumerate(rows) for p, t in enumerate(row)])
        new: list[list[int]] = [[] for _ in rows]
        while True:
            for seq, i in enumerate(outputs):
                logits = llama_cpp.llama_get_logits_ith(ctx, i)
                new[seq].append(int(np.argmax(np.ctypeslib.as_array(logits, shape=(V,)))))
            if len(new[0]) == new_tokens:
                return new
            outputs = decode([(new[s][-1], len(rows[s]) + len(new[s]) - 1, s, True)
                              for s in range(len(rows))])
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def infer_worker(args) -> dict:
    """Peak RSS (MB) and wall time of `python -m cllm infer` on args.model, from a small worker
    so that the process starts from nothing large."""
    from common import run_measured
    wall, _, rss = run_measured([sys.executable, "-m", "cllm", "infer", "-m", args.model, "-p",
                                 "def main(", "-n", str(args.tokens), "--threads",
                                 str(args.threads)], args.threads)
    return dict(rss_mb=rss, wall_s=wall)


WORKERS = {"cllm": cllm_worker, "hf": hf_worker, "llama": llama_worker, "infer": infer_worker}


# ---- the files the workers read ----

def save_seed_model_with_tokenizer(path: str) -> None:
    """The seed configuration with a 30000-token BPE tokenizer trained on the standard
    library's source, as `cllm infer` would meet it."""
    from cllm import Model, ModelConfig
    from cllm.tokenizer import train_bpe
    from common import SEED_CONFIG
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py"):
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    tokenizer = train_bpe(texts, SEED_CONFIG["vocab_size"])
    config = ModelConfig(**{**SEED_CONFIG, "vocab_size": tokenizer.get_vocab_size()})
    Model.create(config, seed=0, tokenizer=tokenizer).save(path)


def export_seed_gguf(folder: str, types) -> dict[str, str]:
    """The seed model as a GGUF file of each type: type -> path. llama.cpp is given token ids,
    never text, but a GGUF file needs a tokenizer: one of the ASCII letters, every other id an
    unused token."""
    from cllm import Model, ModelConfig
    from cllm.interop.gguf_export import export_gguf
    from cllm.tokenizer import train_char
    from common import SEED_CONFIG
    model = Model.create(ModelConfig(**SEED_CONFIG), seed=0,
                         tokenizer=train_char([string.ascii_letters]))
    paths = {}
    for type_name in types:
        paths[type_name] = os.path.join(folder, f"seed-{type_name}.gguf")
        export_gguf(model, paths[type_name], type_name)
    return paths


def llama_cpp_imports() -> bool:
    """Whether llama_cpp imports, tried in a process of its own (never next to cllm)."""
    return subprocess.run([sys.executable, "-c", "import llama_cpp"],
                          capture_output=True).returncode == 0


# ---- the report ----

def agreement(ids: list[int], reference: list[int]) -> str:
    same = sum(a == b for a, b in zip(ids, reference))
    text = f"{same}/{len(reference)} equal ({same / len(reference):.0%})"
    first = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
    return text if first is None else f"{text}, first difference at new token {first}"


def name_and_format(system: str, result: dict) -> tuple[str, str]:
    kind, _, fmt = system.partition("-")
    if kind == "cllm":
        return "cllm", fmt
    if kind == "hf":
        return f"Hugging Face ({result['version']})", "float32"
    return f"llama.cpp ({result['version']})", fmt.upper()


def report(args, config, results: dict, infer: dict, notes: list[str]) -> list[str]:
    from common import machine_line
    lines = [f"# Generation, seed configuration ({config.describe()})", "",
             f"{machine_line()}; {args.threads} threads; greedy; batch-1 and batch prompts of "
             f"{PROMPT_TOKENS} tokens and {args.tokens} new tokens; time to first token (TTFT) "
             f"after a {LONG_PROMPT_TOKENS}-token prompt; best of {REPEATS} after a warm-up"
             + (f"; only {args.only}" if args.only else ""), "",
             "tokens/s: new tokens of all sequences per second of the whole generate call "
             "(prompt included). GB/s: bytes of weights read per decoding step (one token of "
             "every sequence) times steps per second.", "",
             "| system | format | batch | tokens/s | GB/s | TTFT ms |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for system, r in results.items():
        name, fmt = name_and_format(system, r)
        step_bytes = weight_bytes_per_token(config, system.partition("-")[2] or "float32")
        rate = args.tokens / r["decode_s"]
        lines.append(f"| {name} | {fmt} | 1 | {rate:.1f} | {step_bytes * rate / 1e9:.1f} | "
                     f"{r['ttft_s'] * 1e3:.1f} |")
        if "batch_s" in r:
            steps = args.tokens / r["batch_s"]
            lines.append(f"| {name} | {fmt} | {args.batch} | {args.batch * steps:.1f} | "
                         f"{step_bytes * steps / 1e9:.1f} | |")
    lines.append("")
    lines += [f"- {note}" for note in notes]
    for fmt in CLLM_FORMATS:
        r = results.get(f"cllm-{fmt}")
        if r and "batch_s" in r:
            lines.append(f"- cllm {fmt}: batch {args.batch} gives "
                         f"{args.batch * r['decode_s'] / r['batch_s']:.2f}x the tokens/s of "
                         f"batch 1")
        if r:
            lines.append(f"- cllm {fmt} prefill of {LONG_PROMPT_TOKENS} tokens: TTFT "
                         f"{r['ttft_s'] * 1e3:.1f} ms batched, {r['stepwise_s'] * 1e3:.1f} ms "
                         f"token by token (decoder.step): {r['stepwise_s'] / r['ttft_s']:.1f}x "
                         f"faster; same first token: {'yes' if r['same_first'] else 'NO'}")
    reference = results.get("cllm-float32")
    if reference and "batch_ids" in reference:
        lines.append(f"- cllm float32, first sequence of the batch vs batch 1: "
                     f"{agreement(reference['batch_ids'][0], reference['ids'])}")
    for system, r in results.items() if reference else ():
        if system == "cllm-float32":
            continue
        name, fmt = name_and_format(system, r)
        name = f"{name.split(' (')[0]} {fmt}"
        lines.append(f"- greedy ids, {name} vs cllm float32, batch 1: "
                     f"{agreement(r['ids'], reference['ids'])}")
        if not system.startswith("cllm") and "batch_ids" in r and "batch_ids" in reference:
            equal = sum(a == b for a, b in zip(reference["batch_ids"], r["batch_ids"]))
            lines.append(f"- greedy ids, {name} vs cllm float32, batch {args.batch}: "
                         f"{equal}/{args.batch} sequences equal")
    sampler = {name_and_format(s, r)[1]: r["sampler_same"] for s, r in results.items()
               if "sampler_same" in r}
    if sampler:
        lines.append("- llama.cpp's own greedy sampler (Llama.generate, temp=0) gives the "
                     "argmax ids: " + ", ".join(f"{fmt} {'yes' if same else 'NO'}"
                                                for fmt, same in sampler.items()))
    for fmt, r in infer.items():
        lines.append(f"- one-shot `cllm infer -n {args.tokens} --threads {args.threads}` on the "
                     f"{fmt} file: peak RSS {r['rss_mb']:.0f} MB, {r['wall_s']:.1f} s")
    return lines


# ---- the run ----

def chosen_systems(args) -> list[str]:
    names = args.only.split(",") if args.only else ["cllm", "hf", "llama", "infer"]
    systems = []
    for name in names:
        matches = [s for s in SYSTEMS if s == name or s.startswith(name + "-")]
        if not matches:
            raise SystemExit(f"--only: unknown system {name!r} (systems: cllm, hf, llama, "
                             f"infer, or one of {', '.join(SYSTEMS)})")
        systems += [s for s in matches if s not in systems]
    if args.no_torch:
        systems = [s for s in systems if s != "hf"]
    if args.no_llama:
        systems = [s for s in systems if not s.startswith("llama")]
    return [s for s in SYSTEMS if s in systems]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of every system (default: the usable cores)")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens (default: 200)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together (default: 8)")
    ap.add_argument("--no-torch", action="store_true", help="leave out Hugging Face")
    ap.add_argument("--no-llama", action="store_true", help="leave out llama.cpp")
    ap.add_argument("--only", help="a comma list of systems: cllm, hf, llama, infer, or single "
                                   f"ones ({', '.join(SYSTEMS)})")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=CLLM_FORMATS, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    limit = 256 - PROMPT_TOKENS   # n_ctx of the seed configuration; Hugging Face cannot slide
    if not 1 <= args.tokens <= limit or args.threads < 1 or args.batch < 1:
        ap.error(f"--tokens must lie in [1, {limit}], --threads and --batch be at least 1")
    return args


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    from cllm import ModelConfig
    from common import REPO, SEED_CONFIG, run_measured, run_worker
    config = ModelConfig(**SEED_CONFIG)
    systems = chosen_systems(args)
    common = ["--threads", str(args.threads), "--tokens", str(args.tokens),
              "--batch", str(args.batch)]
    results, infer, notes = {}, {}, []

    def run(system, worker, *extra):
        print(f"{system}...", file=sys.stderr, flush=True)
        results[system] = run_worker(__file__, worker, *common, *extra, threads=args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in CLLM_FORMATS:
            if f"cllm-{fmt}" in systems:
                run(f"cllm-{fmt}", "cllm", "--format", fmt)
        if "hf" in systems:
            if all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
                run("hf", "hf")
            else:
                notes.append("Hugging Face: skipped, PyTorch or transformers is not installed "
                             "(pip install torch transformers)")
        types = [s.partition("-")[2] for s in systems if s.startswith("llama")]
        if types and llama_cpp_imports():
            for type_name, path in export_seed_gguf(tmp, types).items():
                run(f"llama-{type_name}", "llama", "--gguf", path)
        elif types:
            notes.append(f"llama.cpp: skipped, llama_cpp does not import; install it with "
                         f"{LLAMA_INSTALL}")
        if "infer" in systems:
            path, int8_path = os.path.join(tmp, "seed.cllm"), os.path.join(tmp, "seed-int8.cllm")
            save_seed_model_with_tokenizer(path)
            run_measured([sys.executable, "-m", "cllm", "quantize", "-m", path, "-o", int8_path,
                          "--to", "int8"], args.threads)
            for fmt, file in (("float32", path), ("int8", int8_path)):
                infer[fmt] = run_worker(__file__, "infer", *common, "--model", file,
                                        threads=args.threads)
    text = "\n".join(report(args, config, results, infer, notes)) + "\n"
    print(text, end="")
    out = REPO / "bench" / "out" / "generate.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(f"(written to {out.relative_to(REPO)})")


if __name__ == "__main__":
    main()
