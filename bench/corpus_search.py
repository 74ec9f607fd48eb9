#!/usr/bin/env python
"""Search and quantization at corpus scale, side by side with sentence-transformers.

    .venv/bin/python bench/corpus_search.py --corpus /tmp/corpus-bench/small_whole --work /tmp/corpus-bench

Search: the embedded corpus (embed_corpus.py's float32 folder, e.g. bench/corpus_scale.py's 50,000 texts)
repeated to --rows rows, each copy plus N(0, --noise) per dimension (so no two rows are equal), saved once as
WORK/corpus_ROWS.npy; --queries Quora dev questions (sentence2, distinct) embedded as queries; top_k 10, cosine.
Each library runs in a fresh process (its peak RSS is its own), the corpus read from the same .npy:
- ours: minilm_jax.place_corpus (the corpus on the device, in chunks of --chunk-rows) then search;
- theirs: util.semantic_search on torch tensors, its defaults (query chunks of 100, corpus chunks of 500,000).
Hits are compared: ids equal, or, where not, the two rows' scores within 1e-6 of each other (a near tie that
float32 rounding orders either way); scores within 1e-6. Also ours on the corpus quantized to ubinary and
int8 (rescored), against the float32 hits.

Quantization: every precision of quantize_embeddings on the --rows corpus, ours against theirs, byte for byte
(int8/uint8 calibrated on the first 10,000 rows). Retrieval quality: evaluate.py's retrieval evaluator on
quora_dev.tsv with the corpus at each precision (minilm_jax.evaluators.retrieval_metrics, precision=...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402
from minilm_jax.quantize import PRECISIONS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load() -> list[str]:
    return open("/proc/loadavg").read().split(" ", 3)[:3]


def build_corpus(folder: str, rows: int, noise: float, path: Path) -> None:
    import numpy as np

    from minilm_jax.corpus import Corpus

    base = Corpus.open(folder).stored().astype(np.float32)
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(rows, base.shape[1]))
    for start in range(0, rows, len(base)):
        n = min(len(base), rows - start)
        out[start:start + n] = base[:n] + (rng.standard_normal((n, base.shape[1]), dtype=np.float32) * noise
                                           if start else 0)
    out.flush()
    del out
    os.replace(path.with_suffix(".tmp.npy"), path)


def make_queries(data_dir: Path, n: int, path: Path, model: str) -> None:
    import numpy as np

    import minilm_jax

    _, b, _ = common.read_pairs_tsv(data_dir / "quora_dev.tsv")
    texts = list(dict.fromkeys(b))[:n]
    np.save(path, minilm_jax.encode(texts, minilm_jax.load(model)))


def worker(which: str, corpus_path: str, queries_path: str, out_path: str, chunk_rows: int, query_chunk: int,
           precision: str) -> None:
    import numpy as np

    queries = np.load(queries_path)
    corpus = np.load(corpus_path, mmap_mode="r")
    if which == "st":
        import torch
        from sentence_transformers import util

        torch.set_num_threads(2)
        t0 = time.perf_counter()
        c = torch.from_numpy(np.ascontiguousarray(corpus))
        placed_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        hits = util.semantic_search(torch.from_numpy(queries), c, top_k=10)
        search_s = time.perf_counter() - t1
        ids = np.array([[h["corpus_id"] for h in row] for row in hits])
        scores = np.array([[h["score"] for h in row] for row in hits])
        extra = {}
    else:
        import minilm_jax
        from minilm_jax.quantize import CALIBRATED, quantize, ranges_of
        from minilm_jax.search import place_corpus, search

        ranges = ranges_of(corpus[:10000]) if precision in CALIBRATED else None
        stored = corpus if precision == "float32" else np.concatenate(
            [quantize(corpus[i:i + 65536], precision, ranges) for i in range(0, len(corpus), 65536)])
        t0 = time.perf_counter()
        placed = place_corpus(stored, precision, chunk_rows=chunk_rows, ranges=ranges, dim=corpus.shape[1])
        placed_s = time.perf_counter() - t0
        search(queries[:query_chunk], placed, 10, query_chunk_size=query_chunk)  # compile, timed apart
        t1 = time.perf_counter()
        scores, ids = search(queries, placed, 10, query_chunk_size=query_chunk)
        search_s = time.perf_counter() - t1
        extra = {"device_corpus_mib": round(placed.device_bytes / 2**20, 1),
                 "score_matrix_mib": round(query_chunk * placed.chunk_rows * 4 / 2**20, 1),
                 "compile_and_first_chunk_s": round(t1 - t0 - placed_s, 2), "precision": precision}
        del minilm_jax
    np.savez(out_path, ids=ids, scores=scores)
    import resource

    print(json.dumps({"which": which, "queries": len(queries), "rows": len(corpus), "place_s": round(placed_s, 2),
                      "search_s": round(search_s, 2), "queries_per_second": round(len(queries) / search_s, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}))


def run_worker(args, which, corpus_path, queries_path, out, precision="float32") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", which, str(corpus_path), str(queries_path),
            str(out), str(args.chunk_rows), str(args.query_chunk), precision, "--corpus", "-", "--work", "-"]
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"error: the {which} worker failed ({proc.returncode})")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    result["load"] = load()
    return result


def compare(ours_path, theirs_path) -> dict:
    import numpy as np

    a, b = np.load(ours_path), np.load(theirs_path)
    same = a["ids"] == b["ids"]
    differ = ~same
    near_tie = np.abs(a["scores"][differ] - b["scores"][differ]) <= 1e-6
    return {"hits": int(same.size), "ids_equal": int(same.sum()), "ids_differ": int(differ.sum()),
            "differing_are_near_ties": bool(near_tie.all()), "queries_all_equal": int(same.all(axis=1).sum()),
            "max_score_diff": float(np.abs(a["scores"] - b["scores"]).max())}


def recall_against(ours_path, float_path) -> float:
    import numpy as np

    a, b = np.load(ours_path)["ids"], np.load(float_path)["ids"]
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a.tolist(), b.tolist())]))


def quantization_parity(corpus_path) -> dict:
    import numpy as np
    from sentence_transformers.util.quantization import quantize_embeddings

    from minilm_jax.quantize import quantize, ranges_of

    corpus = np.load(corpus_path, mmap_mode="r")
    calibration = np.asarray(corpus[:10000])
    ranges = ranges_of(calibration)
    out = {}
    for precision in PRECISIONS:
        equal = True
        for i in range(0, len(corpus), 100_000):
            part = np.asarray(corpus[i:i + 100_000])
            ours = quantize(part, precision, ranges)
            theirs = part.astype(np.float16) if precision == "float16" else quantize_embeddings(
                part, precision, calibration_embeddings=calibration)
            equal &= ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
        out[precision] = bool(equal)
    return out


def retrieval_by_precision(data_dir: Path, model: str) -> dict:
    import minilm_jax
    from minilm_jax.evaluators import _embed_unique, retrieval_from_pairs, retrieval_metrics
    from minilm_jax.pairs import Columns, load_pairs

    data = retrieval_from_pairs(load_pairs(str(data_dir / "quora_dev.tsv"), Columns()))
    emb, row = _embed_unique(minilm_jax.load(model), data.queries + data.corpus, 32, "float32")
    q, c = emb[[row[t] for t in data.queries]], emb[[row[t] for t in data.corpus]]
    out = {"queries": len(data.query_ids), "corpus": len(data.corpus_ids)}
    for precision in PRECISIONS:
        m = retrieval_metrics(q, c, data, "cosine", precision)
        out[precision] = {k.removeprefix("cosine_"): round(m[k], 4) for k in
                          ("cosine_ndcg@10", "cosine_mrr@10", "cosine_map@100", "cosine_accuracy@1", "cosine_recall@10")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="an embed_corpus.py float32 folder")
    p.add_argument("--work", required=True)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--noise", type=float, default=0.005)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--chunk-rows", type=int, default=131072)
    p.add_argument("--query-chunk", type=int, default=256)
    p.add_argument("--model", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["search", "quantized", "parity", "retrieval"])
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        w = args.worker
        return worker(w[0], w[1], w[2], w[3], int(w[4]), int(w[5]), w[6])
    common.script_setup(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = common.default_data_dir()
    corpus_path = work / f"corpus_{args.rows}.npy"
    if not corpus_path.exists():
        build_corpus(args.corpus, args.rows, args.noise, corpus_path)
    queries_path = work / f"queries_{args.queries}.npy"
    if not queries_path.exists():
        make_queries(data_dir, args.queries, queries_path, args.model)
    results = {"machine": common.machine_line(), "rows": args.rows, "queries": args.queries,
               "chunk_rows": args.chunk_rows, "query_chunk": args.query_chunk}

    def report(name, value):
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    if "search" not in args.skip:
        report("ours", run_worker(args, "ours", corpus_path, queries_path, work / "ours.npz"))
        report("st", run_worker(args, "st", corpus_path, queries_path, work / "st.npz"))
        report("ours_again", run_worker(args, "ours", corpus_path, queries_path, work / "ours.npz"))
        report("same_hits", compare(work / "ours.npz", work / "st.npz"))
    if "quantized" not in args.skip:
        for precision in ("ubinary", "int8"):
            report(f"ours_{precision}", run_worker(args, "ours", corpus_path, queries_path,
                                                   work / f"ours_{precision}.npz", precision))
            report(f"ours_{precision}_recall@10_of_float32",
                   round(recall_against(work / f"ours_{precision}.npz", work / "ours.npz"), 4))
    if "parity" not in args.skip:
        report("quantize_embeddings_equal_bytes", quantization_parity(corpus_path))
    if "retrieval" not in args.skip:
        report("retrieval_quora_dev", retrieval_by_precision(data_dir, args.model))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
