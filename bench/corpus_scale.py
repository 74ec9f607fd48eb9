#!/usr/bin/env python
"""Corpus scale, side by side with sentence-transformers: embed_corpus.py on 50,000 and 500,000 distinct texts
(peak memory, texts/s, kill -9 then resume), sentence-transformers' encode on a subset of the same texts.

    .venv/bin/python bench/corpus_scale.py --work /tmp/corpus-bench                  # 500,000 texts
    .venv/bin/python bench/corpus_scale.py --work /tmp/corpus-bench --n 100000 --small 10000

The texts: every distinct sentence of the shared Quora (train, dev, extra) and STS-B (train, dev) files,
shuffled with seed 0, then again with " (2)", " (3)", ... appended until --n texts (all distinct), one a
line in WORK/texts.txt (`bench/corpus_scale.py` writes it once).

Runs, each a fresh process whose peak RSS (wait4's ru_maxrss) is its own, in this order:
1. sentence-transformers encode (batch 32, torch on the machine's 2 threads) of --st-n texts spread evenly over
   the corpus (every n/st-n-th), so that they have its mix of lengths: the first texts are the unsuffixed
   sentences, 15.5 tokens on average against the corpus's 17.9 (so theirs would look 15% faster on them);
   20,000 by default: at 5,000 (12-15 s) the same encode gave 325 and 424 texts/s before and after one run;
2. embed_corpus.py on the first --small texts, uninterrupted; then the same, killed with SIGKILL when half
   of its shards are written and run again: every shard equal, byte for byte;
3. embed_corpus.py on all --n texts, killed in the middle and resumed: rows 0..n-1 each in exactly one
   shard, and --check-shards shards (the one cut by the kill, the first and the last) embedded again here,
   uninterrupted, equal byte for byte;
4. sentence-transformers again (the machine's load moves; both figures are shown).
texts/s of embed_corpus.py is its own figure (rows written / seconds of its embedding loop, first compile
included); the machine's load average is printed at each step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("quora_train.tsv", "quora_dev.tsv", "quora_extra_normalised.tsv", "stsb_train.tsv", "stsb_dev.tsv")


def load() -> str:
    return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()


def make_texts(data_dir: Path, n: int, path: Path) -> None:
    seen: dict = {}
    for name in SOURCES:
        a, b, _ = common.read_pairs_tsv(data_dir / name)
        for text in (*a, *b):
            text = " ".join(text.split())
            if text:
                seen.setdefault(text, None)
    base = list(seen)
    random.Random(0).shuffle(base)
    texts = [t if i < len(base) else f"{t} ({i // len(base) + 1})" for i in range(n) for t in (base[i % len(base)],)]
    assert len(set(texts)) == n
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(texts) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"{path}: {n} distinct texts from {len(base)} distinct sentences", flush=True)


def head(src: Path, n: int, dst: Path) -> Path:
    if not dst.exists():
        with open(src, encoding="utf-8") as f:
            dst.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return dst


def run(argv: list[str], env: dict, kill_when=None) -> dict:
    """A fresh process: its exit status, wall seconds, peak RSS in MiB and last JSON line; kill_when() True:
    SIGKILL it."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    killed = False
    if kill_when is not None:
        while proc.poll() is None and not kill_when():
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not killed and proc.returncode != 0:
        sys.exit(f"error: {' '.join(argv[:2])} failed ({proc.returncode})")
    return {"rc": proc.returncode, "killed": killed, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "result": json.loads(lines[-1]) if lines else None,
            "load": load()}


def embed_args(texts: Path, out: Path, extra=()) -> list[str]:
    return [str(REPO / "embed_corpus.py"), str(texts), "--output-dir", str(out), "--no-progress", *extra]


def shards_written(out: Path) -> int:
    return len(list(out.glob("shard-*.json"))) if out.exists() else 0


def n_shards(rows: int, shard_rows: int) -> int:
    return -(-rows // shard_rows)


def st_worker(texts_file: str, n: int, model: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    every = Path(texts_file).read_text(encoding="utf-8").splitlines()
    texts = every[:: max(1, len(every) // n)][:n]  # the corpus's mix of lengths (see the docstring)
    st = SentenceTransformer(model, device="cpu")
    st.encode(texts[:64], batch_size=32)
    t0 = time.perf_counter()
    st.encode(texts, batch_size=32)
    seconds = time.perf_counter() - t0
    print(json.dumps({"texts": n, "seconds": round(seconds, 2), "texts_per_second": round(n / seconds, 1)}))


def shard_bytes(folder: Path) -> dict:
    m = json.loads((folder / "corpus.json").read_text())
    return {s["file"]: (folder / s["file"]).read_bytes() for s in m["shards"]}


def check_rows_once(folder: Path, rows: int) -> dict:
    m = json.loads((folder / "corpus.json").read_text())
    covered = [(s["start"], s["stop"]) for s in m["shards"]]
    contiguous = covered[0][0] == 0 and covered[-1][1] == rows and all(
        a[1] == b[0] for a, b in zip(covered, covered[1:]))
    import numpy as np

    total = sum(np.load(folder / s["file"], mmap_mode="r").shape[0] for s in m["shards"])
    return {"complete": m["complete"], "contiguous": contiguous, "rows_in_shards": total, "rows": rows}


def recheck_shards(folder: Path, texts: Path, indices: list[int], model: str) -> dict:
    """The shards `indices` embedded again in this process, uninterrupted, as embed_corpus embeds them."""
    import itertools

    import numpy as np

    import minilm_jax
    from minilm_jax.corpus import blocks, read_manifest

    m = read_manifest(str(folder))
    shard_rows = m["shard_rows"]
    model_ = minilm_jax.load(model)
    lines = texts.read_text(encoding="utf-8").splitlines()
    equal = {}
    for i in indices:
        start, stop = i * shard_rows, min(m["rows"], (i + 1) * shard_rows)
        emb = np.concatenate([minilm_jax.encode(b, model_) for b in
                              blocks(itertools.islice(iter(lines), start, None), start, stop, 4096)])
        equal[i] = np.load(folder / f"shard-{i:05d}.npy").tobytes() == emb.astype(np.float32).tobytes()
    return equal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (texts, corpora, compilation cache)")
    p.add_argument("--n", type=int, default=500_000)
    p.add_argument("--small", type=int, default=50_000)
    p.add_argument("--st-n", type=int, default=20_000,
                   help="texts sentence-transformers encodes, spread evenly over the corpus (default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=16384)
    p.add_argument("--check-shards", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["st", "small", "large"])
    p.add_argument("--json", default=None)
    p.add_argument("--st-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.st_worker:
        return st_worker(args.st_worker[0], int(args.st_worker[1]), args.st_worker[2])
    common.script_setup(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINILM_JAX_CACHE_DIR": str(work / "xla"),
           "TOKENIZERS_PARALLELISM": "false"}
    data_dir = Path(args.data_dir) if args.data_dir else common.default_data_dir()
    texts = work / f"texts{args.n}.txt"
    if not texts.exists():
        make_texts(data_dir, args.n, texts)
    small = head(texts, args.small, work / f"texts{args.small}.txt")
    results = {"machine": common.machine_line(), "n": args.n, "small": args.small, "shard_rows": args.shard_rows}
    shard = ["--shard-rows", str(args.shard_rows)]

    def report(name, value):
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    st_argv = [str(Path(__file__).resolve()), "--work", str(work), "--st-worker", str(texts), str(args.st_n), args.model]
    if "st" not in args.skip:
        report("st_before", run(st_argv, env))
    if "small" not in args.skip:
        whole, killed = work / "small_whole", work / "small_killed"
        for d in (whole, killed):
            if d.exists():
                import shutil

                shutil.rmtree(d)
        report("small_uninterrupted", run(embed_args(small, whole, shard), env))
        half = n_shards(args.small, args.shard_rows) // 2
        report("small_killed", run(embed_args(small, killed, shard), env, lambda: shards_written(killed) >= half))
        report("small_resumed", run(embed_args(small, killed, shard), env))
        report("small_equal_bytes", shard_bytes(whole) == shard_bytes(killed))
    if "large" not in args.skip:
        large = work / "large"
        total = n_shards(args.n, args.shard_rows)
        if not (large / "corpus.json").exists() or not json.loads((large / "corpus.json").read_text()).get("complete"):
            report("large_killed", run(embed_args(texts, large, shard), env,
                                       lambda: shards_written(large) >= total // 2))
            cut = shards_written(large)
            report("large_resumed", run(embed_args(texts, large, shard), env))
        else:
            cut = total // 2
        report("large_rows_once", check_rows_once(large, args.n))
        picks = sorted({0, min(cut, total - 1), total - 1})[:args.check_shards]
        report("large_shards_equal_uninterrupted", recheck_shards(large, texts, picks, args.model))
    if "st" not in args.skip:
        report("st_after", run(st_argv, env))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
