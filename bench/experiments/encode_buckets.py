#!/usr/bin/env python
"""Experiment: what a coarser length ladder costs minilm_jax.encode on CPU. encode's CPU ladder (23
lengths up to 256: steps of 4 to 64) against 13 lengths (steps of 8 to 48, then ~1.25x) and the
8 lengths encode uses on GPU/TPU (~1.5x apart), by monkeypatching minilm_jax.encode.length_buckets.
Same process, interleaved passes, median. Prints padded-token counts (ours vs sentence-transformers,
which pads each batch to its longest sentence), the programs each ladder compiles, and throughput.

    .venv/bin/python bench/experiments/encode_buckets.py [--affinity 0] [--n 2000]
"""
import argparse
import importlib
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402


def ladder(lengths):
    return lambda max_seq_length, backend=None: tuple(n for n in lengths if n < max_seq_length) + (max_seq_length,)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--affinity", default=None)
    args = p.parse_args()
    common.offline_env()
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))
    import numpy as np

    import minilm_jax
    from encode import pick_sentences

    enc = importlib.import_module("minilm_jax.encode")
    ladders = {"23 lengths (encode on CPU)": enc.length_buckets,
               "13 lengths": ladder([8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192]),
               "8 lengths (encode on GPU/TPU)": ladder(enc._ACCELERATOR_LENGTHS)}
    model = minilm_jax.load(common.default_model_path())
    sentences = pick_sentences(common.default_data_dir() / "quora_train.tsv", args.n)
    lengths = np.array(sorted((len(t) for t in model.tokenizer.token_ids(sentences)), reverse=True))
    print(f"machine: {common.machine_line()}; {args.n} sentences, {lengths.sum()} real tokens, CPUs "
          f"{sorted(os.sched_getaffinity(0))}")
    for bs in args.batch_sizes:
        rows_ladder = enc.row_buckets(min(bs, enc._CPU_ROWS_PER_CALL), 1, "cpu")
        per_call = rows_ladder[-1]
        st_tokens = sum(len(lengths[i:i + bs]) * lengths[i] for i in range(0, len(lengths), bs))
        times, embs = {}, {}
        for name, fn in ladders.items():
            enc.length_buckets = fn
            buckets = fn(256)
            ours = sum(next(r for r in rows_ladder if r >= len(lengths[i:i + per_call]))
                       * enc.bucket_length(lengths[i], buckets) for i in range(0, len(lengths), per_call))
            before = enc.compiled_programs()
            enc.encode(sentences, model, batch_size=bs)  # compile every shape
            print(f"batch {bs} {name}: padded tokens {ours} ({ours / lengths.sum():.2f}x real; "
                  f"sentence-transformers {st_tokens / lengths.sum():.2f}x), {enc.compiled_programs() - before} "
                  "new programs")
        for p_ in range(args.passes):
            for name in (list(ladders) if p_ % 2 == 0 else list(ladders)[::-1]):
                enc.length_buckets = ladders[name]
                t0 = time.perf_counter()
                embs[name] = enc.encode(sentences, model, batch_size=bs)
                times.setdefault(name, []).append(time.perf_counter() - t0)
        first = next(iter(ladders))
        for name in ladders:
            print(f"batch {bs} {name}: {args.n / np.median(times[name]):.0f} sentences/s median, "
                  f"{args.n / min(times[name]):.0f} best; {np.median(times[first]) / np.median(times[name]):.2f}x "
                  f"the first's throughput, max |embedding diff| {np.abs(embs[name] - embs[first]).max():.1e}")


if __name__ == "__main__":
    main()
