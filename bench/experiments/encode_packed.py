#!/usr/bin/env python
"""Experiment: encode with sentences PACKED several to a row (as training batches already are)
against minilm_jax.encode (one sentence per row, padded to a bucket length). Interleaved passes in
one process, median; checks that the embeddings are the same.

Packed encode: sentences are grouped by the row length they need (64, 128, 256 tokens), packed
first-fit decreasing into rows of that length, and embedded `rows` rows per call with
embedding.packed_sentence_embeddings (each token attends only to its own sentence, positions restart
at 0), so there is almost no padding and only a few shapes to compile.

    .venv/bin/python bench/experiments/encode_packed.py [--affinity 0] [--n 2000]
"""
import argparse
import importlib
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402

ROW_LENGTHS = (64, 128, 256)


def packed_encode(sentences, model, rows_per_call: int, embed_fns: dict):
    """Embeddings [N, D] (normalised) of `sentences`, packed several to a row."""
    import jax
    import numpy as np

    from minilm_jax.data import pack_sentences
    from minilm_jax.embedding import packed_sentence_embeddings

    token_ids = model.tokenizer.token_ids(sentences)
    lengths = np.array([len(t) for t in token_ids])
    out = np.zeros((len(sentences), model.config.hidden_size), np.float32)
    pending = []
    for lo, P in zip((0,) + ROW_LENGTHS, ROW_LENGTHS):
        members = np.nonzero((lengths > lo) & (lengths <= P))[0]
        if not len(members):
            continue
        rows = pack_sentences([int(lengths[i]) for i in members], P)
        S = rows_per_call * (P // 4)  # sentence slots per call: rows hold at most P/3 sentences, P/4 is plenty
        for start in range(0, len(rows), rows_per_call):
            chunk = rows[start:start + rows_per_call]
            ids = np.zeros((rows_per_call, P), np.int32)
            positions = np.zeros_like(ids)
            segments = np.zeros_like(ids)
            slots = np.full_like(ids, S)
            owners = []
            for r, row in enumerate(chunk):
                at = 0
                for seg, k in enumerate(row, start=1):
                    i = members[k]
                    n = lengths[i]
                    if len(owners) >= S:
                        raise RuntimeError("more sentences than slots in one call")
                    ids[r, at:at + n] = token_ids[i]
                    positions[r, at:at + n] = np.arange(n)
                    segments[r, at:at + n] = seg
                    slots[r, at:at + n] = len(owners)
                    owners.append(i)
                    at += n
            key = (P, S)
            if key not in embed_fns:
                embed_fns[key] = jax.jit(lambda p, b, S=S: packed_sentence_embeddings(p, b, S, config=model.config))
            emb = embed_fns[key](model.params, {"ids": ids, "positions": positions, "segments": segments,
                                                "slots": slots})
            pending.append((owners, emb))
            if len(pending) > 2:
                o, e = pending.pop(0)
                out[o] = np.asarray(e)[:len(o)]
    for o, e in pending:
        out[o] = np.asarray(e)[:len(o)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128],
                   help="encode batch sizes; the packed side uses batch/4 rows of 64 tokens per call")
    p.add_argument("--affinity", default=None)
    args = p.parse_args()
    common.offline_env()
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))
    import numpy as np

    import minilm_jax
    from encode import pick_sentences

    enc = importlib.import_module("minilm_jax.encode")
    model = minilm_jax.load(common.default_model_path())
    sentences = pick_sentences(common.default_data_dir() / "quora_train.tsv", args.n)
    lengths = np.array([len(t) for t in model.tokenizer.token_ids(sentences)])
    print(f"machine: {common.machine_line()}; minilm-jax {common.repo_version()}; {args.n} sentences, "
          f"{lengths.sum()} real tokens, CPUs {sorted(os.sched_getaffinity(0))}")
    for bs in args.batch_sizes:
        rows = max(1, bs // 4)
        fns: dict = {}
        ways = {"encode (buckets)": lambda: enc.encode(sentences, model, batch_size=bs),
                "packed": lambda: packed_encode(sentences, model, rows, fns)}
        t0 = time.perf_counter()
        first = {name: None for name in ways}
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t0
        times, embs = {n: [] for n in ways}, {}
        for p_ in range(args.passes):
            for name in (list(ways) if p_ % 2 == 0 else list(ways)[::-1]):
                t0 = time.perf_counter()
                embs[name] = ways[name]()
                times[name].append(time.perf_counter() - t0)
        for name in ways:
            print(f"batch {bs} {name:16s}: {args.n / np.median(times[name]):4.0f} sentences/s median, "
                  f"{args.n / min(times[name]):4.0f} best, first call {first[name]:.1f} s")
        a, b = list(ways)
        print(f"batch {bs}: packed/buckets throughput {np.median(times[a]) / np.median(times[b]):.2f}x (median), "
              f"packed shapes {sorted(fns)}, max |embedding diff| {np.abs(embs[a] - embs[b]).max():.1e}")


if __name__ == "__main__":
    main()
