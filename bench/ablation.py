"""Ablation of the crystalline switches (CRYSTALLINE.md section 6) through the real trainer, at
BPE scale, on Tiny Shakespeare and on Python standard-library sources.

    PYTHONPATH=src python bench/ablation.py [--steps 100] [--seeds 3] [--threads 1]
        [--settings none angular ulam defaults lattice crystalline] [--corpus both]
        [--runs bench/out/ablation_runs] [--no-timing]
    PYTHONPATH=src python bench/ablation.py --timing-only

Every run is `cllm train` itself, a subprocess ([sys.executable, "-m", "cllm", "train", ...]),
so the ablation measures what users get: the trainer's tokenizer, sampler (random windows
drawn from the run's seed), learning-rate schedule, gradient clipping and final evaluation.
The flags of every run:

    -d CORPUS --tokenizer bpe -v 4000 -s 256 -l 4 -e 256 -H 8 -b 8 -r 1e-3 --min-lr 1e-4
    --warmup 10 --val-fraction 0.1 --eval-every 0 --checkpoint-every 1000000
    --seed SEED -t THREADS --max-steps STEPS --init I --position P --attention A --loss L

(byte-level BPE of about 4,000 tokens trained on the corpus, T = 256, 4 layers x 256 wide with
8 heads, batch 8). The corpora, copied into folders of their own under the runs folder:
Tiny Shakespeare (../shared/data/tinyshakespeare.txt), and a deterministic ~1.5 MB subset of
the installed standard library's *.py files (sysconfig's "stdlib" path without
site-packages, dist-packages, test, tests, idle_test and __pycache__): every k-th file in
sorted path order, k = total size // 1.5 MB, so that it spreads over the whole tree, until
1.5 MB is reached.

The settings: "none" (GPT-2: --init normal --position learned --attention dense --loss ce),
each switch alone on top of it ("lattice", "angular", "ulam", "crystalline"), and "defaults"
(angular and Ulam, the package's defaults). 'none' is always run: the differences are taken
against it, paired by seed (the same seed gives every setting the same batches, and the same
starting weights where its parameters allow).

1. Equal steps: every setting trains --steps steps, once per seed, the settings taking turns
   within each seed. The number compared is the plain validation cross-entropy over the whole
   validation split at the end: the `final_val_loss` record of metrics.jsonl (its
   `final_val_ce` with --loss crystalline, whose final_val_loss is the training loss).
2. Equal time: each setting's training speed relative to none's is the median, over both
   corpora and every seed, of the ratio of its equal-step run's median step rate
   (metrics.jsonl's tokens_per_s, step 1 left out) to that of none's run of the same corpus
   and seed. Within a seed the settings take turns, so the two runs of a pair are close in
   time and share the load other work puts on the machine; the median drops the pairs that a
   burst of such load hit on one side. (The speed depends on the shapes, not the corpus.) A
   setting within 3% of none's speed reuses its equal-step runs; any other trains
   round(steps x ratio) steps, once per seed, so that it gets the training time none had.
   The equal-step runs of both corpora come first, then the equal-time ones.

Per corpus, bench/out/ablation.md gets two tables (equal steps, equal time): the final
validation CE as mean ± std over the seeds, the paired difference from none as mean ± std, the
per-seed values and tokens/s; bench/out/ablation.png plots the training curves and the paired
differences. Each run lives in
RUNS/CORPUS/SETTING_seedN_STEPSsteps/: train.log (the trainer's output), metrics.jsonl,
stats.json and result.json; the trainer's checkpoint folder (model, dataset, tokenizer) is
deleted once read. A run whose result.json holds the same flags is reused, so an interrupted
ablation continues where it stopped. A run that fails or exceeds its timeout stops the
ablation with the end of its log.

Then (unless --no-timing) it times attention alone, forward and backward, Ulam (radius 2)
against dense at T = 1024 and 4096, through the attention kernels of cllm._core on one
sequence (C=128, H=4, one thread), into bench/out/timing.md.

Run one training process at a time (the default) and give the machine's other cores to
whatever else runs there; --threads is passed to `cllm train -t`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, median_seconds, thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OUT = ROOT / "bench" / "out"
RUNS = OUT / "ablation_runs"

VOCAB, SEQ_LEN, LAYERS, EMBED, HEADS, BATCH = 4000, 256, 4, 256, 8, 8
MODEL_FLAGS = ["--tokenizer", "bpe", "-v", str(VOCAB), "-s", str(SEQ_LEN), "-l", str(LAYERS),
               "-e", str(EMBED), "-H", str(HEADS)]
TRAIN_FLAGS = ["-b", str(BATCH), "-r", "1e-3", "--min-lr", "1e-4", "--warmup", "10",
               "--val-fraction", "0.1", "--eval-every", "0", "--checkpoint-every", "1000000"]
STDLIB_BYTES = 1_500_000
SAME_SPEED = 0.03   # settings this close to none's speed reuse their equal-step runs

GPT2 = dict(init="normal", position="learned", attention="dense", loss="ce")
SETTINGS = {   # in the order of the report
    "none": GPT2,
    "lattice": {**GPT2, "init": "lattice"},
    "angular": {**GPT2, "position": "angular"},
    "ulam": {**GPT2, "attention": "ulam"},
    "crystalline": {**GPT2, "loss": "crystalline"},
    "defaults": {**GPT2, "position": "angular", "attention": "ulam"},
}
PRIORITY = ["none", "angular", "ulam", "defaults", "lattice", "crystalline"]
CORPORA = {"shakespeare": "Tiny Shakespeare", "stdlib": "Python standard library"}


# ---- the corpora ----

def shakespeare_corpus(runs: Path) -> tuple[Path, str]:
    folder = runs / "corpora" / "shakespeare"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SHAKESPEARE.name
    if not target.exists() or target.read_bytes() != SHAKESPEARE.read_bytes():
        shutil.copyfile(SHAKESPEARE, target)
    return folder, f"{SHAKESPEARE.name}, {target.stat().st_size / 1e6:.2f} MB"


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's *.py files, without tests and installed packages, in sorted
    order of their paths below the stdlib folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in excluded)
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(runs: Path) -> tuple[Path, str]:
    """Every k-th file, k = total size // STDLIB_BYTES, until STDLIB_BYTES: a deterministic
    subset spread over the whole tree, copied (with its relative paths) into a folder."""
    root, files = stdlib_files()
    total = sum(p.stat().st_size for p in files)
    stride = max(1, total // STDLIB_BYTES)
    chosen, size = [], 0
    for path in files[::stride]:
        if size >= STDLIB_BYTES:
            break
        chosen.append(path)
        size += path.stat().st_size
    folder = runs / "corpora" / "stdlib"
    if folder.exists():
        shutil.rmtree(folder)
    for path in chosen:
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return folder, (f"{len(chosen)} of the {len(files)} *.py files of {root} (every "
                    f"{stride}th in sorted path order), {size / 1e6:.2f} MB")


# ---- one run of cllm train ----

def switch_flags(setting: str) -> list[str]:
    return [arg for name, value in SETTINGS[setting].items() for arg in (f"--{name}", value)]


def run_flags(setting: str, seed: int, steps: int, threads: int) -> list[str]:
    return [*MODEL_FLAGS, *TRAIN_FLAGS, "--max-steps", str(steps), "--seed", str(seed),
            "-t", str(threads), *switch_flags(setting)]


def run_timeout(steps: int) -> float:
    """Seconds a run may take: generous (about 4 times the 1.5 s per step of the slowest
    setting on one thread, plus the phases around training)."""
    return 600 + 6 * steps


def train_run(corpus: str, data: Path, setting: str, seed: int, steps: int, threads: int,
              runs: Path) -> dict:
    folder = runs / corpus / f"{setting}_seed{seed}_{steps}steps"
    flags = run_flags(setting, seed, steps, threads)
    result_path = folder / "result.json"
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if result.get("flags") == flags and result.get("data") == str(data):
            print(f"  {corpus} {setting} seed {seed} {steps} steps: reusing {result_path}",
                  flush=True)
            return result
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    checkpoint, log_path = folder / "checkpoint", folder / "train.log"
    command = [sys.executable, "-m", "cllm", "train", "-d", str(data), "-c", str(checkpoint),
               *flags]
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                                  env=thread_env(threads, None), timeout=run_timeout(steps))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{corpus} {setting} seed {seed}: cllm train ran past its "
                               f"timeout of {run_timeout(steps):.0f} s; its log: {log_path}"
                               f"\n{_tail(log_path)}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{corpus} {setting} seed {seed}: cllm train exited with "
                           f"{done.returncode}; its log: {log_path}\n{_tail(log_path)}")
    result = read_run(checkpoint, steps, setting)
    result.update(corpus=corpus, setting=setting, seed=seed, flags=flags, data=str(data),
                  wall_s=round(time.time() - start, 1))
    for name in ("metrics.jsonl", "stats.json"):
        shutil.copyfile(checkpoint / name, folder / name)
    shutil.rmtree(checkpoint)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  {corpus} {setting} seed {seed} {steps} steps: validation CE "
          f"{result['val_ce']:.4f}, {result['tokens_per_s']:.0f} tokens/s (median step), "
          f"{result['wall_s']:.0f} s", flush=True)
    return result


def _tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, the progress bars' carriage returns made into line ends."""
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def read_run(checkpoint: Path, steps: int, setting: str) -> dict:
    """What the ablation needs from a finished run's metrics.jsonl, stats.json and
    tokenizer.json."""
    records = [json.loads(line) for line in
               (checkpoint / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in records if "final_val_loss" in r]
    if not finals:
        raise RuntimeError(f"{checkpoint}/metrics.jsonl has no final_val_loss record")
    final = finals[-1]
    crystalline = SETTINGS[setting]["loss"] == "crystalline"
    if crystalline and "final_val_ce" not in final:
        raise RuntimeError(f"{checkpoint}/metrics.jsonl: the crystalline loss's final record "
                           f"has no final_val_ce")
    train_steps = [r for r in records if "tokens_per_s" in r]
    stats = json.loads((checkpoint / "stats.json").read_text())
    if stats["steps"] != steps or len(train_steps) != steps:
        raise RuntimeError(f"{checkpoint}: {stats['steps']} steps trained, {steps} asked for")
    rates = [r["tokens_per_s"] for r in train_steps if r["step"] > 1]
    return dict(
        val_ce=final["final_val_ce"] if crystalline else final["final_val_loss"],
        val_loss=final["final_val_loss"], val_tokens=final["val_tokens"], steps=steps,
        step_rates=rates, tokens_per_s=statistics.median(rates),
        train_time_s=stats["train_time_s"], stats_tokens_per_s=stats["tokens_per_s"],
        train_ce=[r.get("ce", r["loss"]) for r in train_steps],
        parameters=stats["parameters"],
        tokenizer_sha256=hashlib.sha256((checkpoint / "tokenizer.json").read_bytes())
        .hexdigest()[:16])


# ---- the ablation of one corpus ----

def equal_step_runs(corpus: str, settings: list[str], seeds: int, steps: int, threads: int,
                    runs: Path) -> dict:
    """Every setting trains `steps` steps once per seed, the settings taking turns."""
    data, description = (shakespeare_corpus if corpus == "shakespeare" else stdlib_corpus)(runs)
    print(f"{CORPORA[corpus]}: {description}", flush=True)
    order = [name for name in PRIORITY if name in settings]
    equal_steps = {name: [] for name in order}
    for seed in range(seeds):
        for name in order:
            equal_steps[name].append(train_run(corpus, data, name, seed, steps, threads, runs))
    hashes = {r["tokenizer_sha256"] for runs_ in equal_steps.values() for r in runs_}
    val_tokens = {r["val_tokens"] for runs_ in equal_steps.values() for r in runs_}
    return dict(corpus=corpus, data=data, description=description, settings=order,
                steps=steps, equal_steps=equal_steps, tokenizers=sorted(hashes),
                val_tokens=sorted(val_tokens),
                parameters={n: equal_steps[n][0]["parameters"] for n in order})


def speed_ratios(results: list[dict]) -> dict[str, float]:
    """Each setting's training speed relative to none's: the median, over every corpus and
    seed, of the ratio of its equal-step run's median step rate to that of none's run of the
    same corpus and seed. The two ran close together in time (the settings take turns within
    a seed), so the ratio cancels most of the load that other work puts on the machine; the
    median over the pairs drops the pairs that a burst of such load hit one side of. The
    speed depends on the shapes alone (batch, T, model, vocabulary), not on the corpus."""
    ratios = {}
    for name in results[0]["settings"]:
        pairs = [statistics.median(r["step_rates"]) / statistics.median(n["step_rates"])
                 for result in results
                 for r, n in zip(result["equal_steps"][name], result["equal_steps"]["none"])]
        ratios[name] = statistics.median(pairs)
    return ratios


def equal_time_runs(result: dict, ratios: dict[str, float], seeds: int, threads: int,
                    runs: Path) -> None:
    """Each setting trains round(steps x its speed ratio) steps: the training time none had.
    Those within SAME_SPEED of none's speed, or whose count rounds to the same, reuse their
    equal-step runs."""
    order, steps = result["settings"], result["steps"]
    equal_time_steps = {name: steps if abs(ratios[name] - 1) <= SAME_SPEED
                        else max(1, round(steps * ratios[name])) for name in order}
    equal_time = {name: result["equal_steps"][name] for name in order
                  if equal_time_steps[name] == steps}
    extra = [name for name in order if name not in equal_time]
    print(f"{CORPORA[result['corpus']]}, equal time: steps "
          + ", ".join(f"{n} {equal_time_steps[n]}" for n in order), flush=True)
    for name in extra:
        equal_time[name] = []
    for seed in range(seeds):
        for name in extra:
            equal_time[name].append(train_run(result["corpus"], result["data"], name, seed,
                                              equal_time_steps[name], threads, runs))
    result.update(equal_time=equal_time, equal_time_steps=equal_time_steps, ratios=ratios)


def speed_of(runs: list[dict]) -> float:
    """Training tokens/s of runs: their median step (step 1 left out)."""
    return statistics.median(rate for r in runs for rate in r["step_rates"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(result: dict, which: str) -> list[dict]:
    none = [r["val_ce"] for r in result["equal_steps"]["none"]]
    out = []
    for name in [n for n in SETTINGS if n in result["settings"]]:
        runs = result[which][name]
        ce = [r["val_ce"] for r in runs]
        mean, std = _mean_std(ce)
        diff, diff_std = _mean_std([a - b for a, b in zip(ce, none)])
        ratio = result["ratios"][name]
        if name == "none":
            note = "the baseline"
        elif which == "equal_time" and runs is result["equal_steps"][name]:
            why = (f"within {100 * SAME_SPEED:.0f}%" if abs(ratio - 1) <= SAME_SPEED
                   else "the same step count once rounded")
            note = f"equal-step runs reused (speed {100 * (ratio - 1):+.1f}%: {why})"
        elif which == "equal_time":
            note = f"own runs (speed {100 * (ratio - 1):+.1f}%)"
        else:
            note = ""
        out.append(dict(name=name, steps=runs[0]["steps"], mean=mean, std=std, diff=diff,
                        diff_std=diff_std, seeds=ce, note=note,
                        tokens_per_s=speed_of(runs), verdict=verdict(name, diff, diff_std)))
    return out


def verdict(name: str, diff: float, spread: float) -> str:
    if name == "none":
        return ""
    if diff > spread:
        return "loses"
    if diff < -spread:
        return "wins"
    return "within spread"


def table(result: dict, which: str) -> str:
    lines = ["| setting | steps | validation CE, mean ± std | minus none (paired), mean ± std "
             "| verdict | per seed | tokens/s | runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows(result, which):
        lines.append(f"| {r['name']} | {r['steps']} | {r['mean']:.4f} ± {r['std']:.4f} | "
                     + (f"{r['diff']:+.4f} ± {r['diff_std']:.4f}" if r["name"] != "none"
                        else "0") + f" | {r['verdict']} | "
                     f"{', '.join(f'{v:.4f}' for v in r['seeds'])} | "
                     f"{r['tokens_per_s']:.0f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def markdown(results: list[dict], header: str) -> str:
    parts = ["# Ablation of the crystalline switches through `cllm train`, BPE scale", "",
             header, "",
             "Validation CE: the plain cross-entropy (nats per token) over the whole "
             "validation split at the end of training (metrics.jsonl's final record: "
             "final_val_ce with the crystalline loss, final_val_loss otherwise). Minus none: "
             "the setting's value minus none's, seed by seed (equal time: against none's "
             "equal-step runs), mean ± std over the seeds. Verdict: loses where that "
             "difference is above zero by more than its std, wins where below by more, "
             "within spread otherwise. tokens/s: the median training step of the runs, "
             "step 1 left out; they measure the load other work put on the machine as much "
             "as the setting. Speed (in the runs column): the setting's training speed "
             "relative to none's, the median over both corpora and every seed of the ratio "
             "of its equal-step run's median step rate to that of none's run of the same "
             "corpus and seed (run next to it in time). Equal time: each setting trains "
             "round(steps x that ratio) steps, the training time none had; settings within "
             f"{100 * SAME_SPEED:.0f}% of none's speed reuse their equal-step runs.", ""]
    for result in results:
        steps = result["steps"]
        parts += [f"## {CORPORA[result['corpus']]}", "",
                  f"{result['description']}; BPE vocabulary, validation tokens and tokenizer "
                  f"hash: {len(result['tokenizers'])} tokenizer(s) "
                  f"({', '.join(result['tokenizers'])}), {', '.join(map(str, result['val_tokens']))}"
                  f" validation tokens; parameters: "
                  + ", ".join(f"{n} {p:,}" for n, p in result["parameters"].items()), "",
                  f"### Equal steps ({steps} steps of {BATCH} x {SEQ_LEN} tokens)", "",
                  table(result, "equal_steps"),
                  "### Equal time (the training time none takes for its steps)", "",
                  table(result, "equal_time")]
    return "\n".join(parts)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.5 * len(results)), squeeze=False)
    for (curves, bars), result in zip(axes, results):
        name_of = CORPORA[result["corpus"]]
        for name in [n for n in SETTINGS if n in result["settings"]]:
            runs = result["equal_steps"][name]
            mean = np.mean([r["train_ce"] for r in runs], axis=0)
            window = max(1, len(mean) // 10)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            curves.plot(np.arange(window, len(mean) + 1), smooth, label=name)
        curves.set_title(f"{name_of}: training cross-entropy (mean over seeds, "
                         f"moving average)", fontsize=9)
        curves.set_xlabel("step")
        curves.set_ylabel("cross-entropy")
        curves.grid(alpha=0.3)
        curves.legend(fontsize=8)
        names = [r["name"] for r in rows(result, "equal_steps") if r["name"] != "none"]
        x = np.arange(len(names))
        for offset, which, label in ((-0.2, "equal_steps", "equal steps"),
                                     (0.2, "equal_time", "equal time")):
            rs = [r for r in rows(result, which) if r["name"] != "none"]
            bars.bar(x + offset, [r["diff"] for r in rs], 0.4,
                     yerr=[r["diff_std"] for r in rs], capsize=4, label=label)
        bars.axhline(0, color="black", linewidth=0.8)
        bars.set_xticks(x, names)
        bars.set_ylabel("final validation CE minus none's (paired, mean ± std)")
        bars.set_title(f"{name_of}: difference from none (below 0: better)", fontsize=9)
        bars.grid(alpha=0.3, axis="y")
        bars.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- attention kernels alone ----

def attention_timing(lengths=(1024, 4096), C=128, H=4, radius=2, repeats=3) -> str:
    import numpy as np
    from cllm import _core, crystal
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    lines = [f"Attention alone (the kernels of cllm._core), forward + backward, one sequence, "
             f"C={C} H={H}, Ulam radius {radius}, one thread; {machine_line()}; load average "
             f"{os.getloadavg()[0]:.2f}", "",
             "| T | dense kernels | Ulam kernels | dense / Ulam |", "| --- | --- | --- | --- |"]
    for T in lengths:
        qkv = rng.standard_normal((1, T, 3 * C), dtype=np.float32)
        dy = rng.standard_normal((1, T, C), dtype=np.float32)
        start, keys = crystal.ulam_neighbours(T, radius)

        def dense():
            _, att = _core.layer_attention(qkv, H)
            _core.layer_attention_backward(dy, att, qkv)

        def ulam():
            _, att = _core.layer_ulam_attention(qkv, H, start, keys)
            _core.layer_ulam_attention_backward(dy, att, qkv, start, keys)

        with threadpool_limits(1):
            times = [median_seconds(dense, repeats), median_seconds(ulam, repeats)]
        lines.append(f"| {T} | {1e3 * times[0]:.1f} ms | {1e3 * times[1]:.1f} ms | "
                     f"{times[0] / times[1]:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def cllm_location(threads: int) -> str:
    """Where the trainer's subprocesses import cllm from."""
    return subprocess.run([sys.executable, "-c", "import cllm; print(cllm.__file__)"],
                          stdout=subprocess.PIPE, text=True, check=True, cwd="/",
                          env=thread_env(threads, None)).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100,
                    help="training steps of every setting at equal steps (default: 100)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default: 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each training run, `cllm train -t` (default: 1)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                    metavar="NAME", help="the settings to train, of "
                    f"{', '.join(SETTINGS)} ('none' is always included: the differences are "
                    "taken against it); default: all of them")
    ap.add_argument("--corpus", choices=("shakespeare", "stdlib", "both"), default="both")
    ap.add_argument("--runs", type=Path, default=RUNS,
                    help=f"folder of the runs and corpora (default: {RUNS.relative_to(ROOT)})")
    ap.add_argument("--out", type=Path, default=OUT,
                    help=f"folder of ablation.md, ablation.png and timing.md (default: "
                         f"{OUT.relative_to(ROOT)})")
    ap.add_argument("--no-timing", action="store_true", help="skip the attention timing")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip the training runs: the attention timing only")
    args = ap.parse_args()
    if args.steps < 1 or args.seeds < 1 or args.threads < 0:
        ap.error("--steps and --seeds must be positive, --threads not negative")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.timing_only:
        runs = args.runs.resolve()
        runs.mkdir(parents=True, exist_ok=True)
        settings = ["none"] + [name for name in args.settings if name != "none"]
        corpora = ["shakespeare", "stdlib"] if args.corpus == "both" else [args.corpus]
        print(f"cllm train from {cllm_location(args.threads)}", flush=True)
        load, start = os.getloadavg(), time.time()
        results = [equal_step_runs(corpus, settings, args.seeds, args.steps, args.threads, runs)
                   for corpus in corpora]
        ratios = speed_ratios(results)
        print("speed relative to none's (median of the paired ratios): "
              + ", ".join(f"{n} {r:.3f}" for n, r in ratios.items()), flush=True)
        for result in results:
            equal_time_runs(result, ratios, args.seeds, args.threads, runs)
        run_seconds = sum(r["wall_s"] for result in results
                          for which in ("equal_steps", "equal_time")
                          for name, runs_ in result[which].items()
                          if which == "equal_steps" or runs_ is not result["equal_steps"][name]
                          for r in runs_)
        header = (f"{machine_line()}; {args.threads} thread(s) per run "
                  f"(`-t {args.threads}`), one training process at a time; load average "
                  f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
                  f"{args.steps} steps at equal steps, seeds 0-{args.seeds - 1}; "
                  f"{run_seconds:.0f} s of training processes in all. Every run: "
                  f"`python -m cllm train -d CORPUS {' '.join(MODEL_FLAGS + TRAIN_FLAGS)} "
                  f"--max-steps STEPS --seed SEED -t {args.threads}` plus the setting's "
                  f"`--init I --position P --attention A --loss L`")
        (args.out / "ablation.md").write_text(markdown(results, header))
        plot(results, args.out / "ablation.png", textwrap.fill(header, 180))
        print(f"wrote {args.out / 'ablation.md'} and ablation.png "
              f"({time.time() - start:.0f} s)", flush=True)
        print((args.out / "ablation.md").read_text(), flush=True)
    if not args.no_timing:
        timing = attention_timing()
        (args.out / "timing.md").write_text(timing)
        print(timing, flush=True)


if __name__ == "__main__":
    main()
