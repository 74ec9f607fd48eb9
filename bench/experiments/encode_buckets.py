#!/usr/bin/env python
"""Experiment: minilm_jax.encode with the repo's bucket ladder (16, 24, 32, ... 8 apart) against a
finer one (8, 12, 16, ... 4 apart below 64), by monkeypatching minilm_jax.encode.bucket_lengths.
Same process, interleaved passes, median. Prints padded-token counts (ours vs sentence-transformers,
which pads each batch to its longest sentence) and throughput.

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


def fine(max_seq_length):
    ladder = [*range(8, 65, 4), *range(80, 129, 16), *range(160, 513, 32)]
    return tuple(n for n in ladder if n < max_seq_length) + (max_seq_length,)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--affinity", default=None)
    args = p.parse_args()
    common.offline_env()
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))
    import numpy as np

    import minilm_jax
    from encode import pick_sentences

    enc = importlib.import_module("minilm_jax.encode")
    ladders = {"repo ladder": enc.bucket_lengths, "fine ladder": fine}
    model = minilm_jax.load(common.default_model_path())
    sentences = pick_sentences(common.default_data_dir() / "quora_train.tsv", args.n)
    lengths = np.array(sorted((len(t) for t in model.tokenizer.token_ids(sentences)), reverse=True))
    print(f"machine: {common.machine_line()}; {args.n} sentences, {lengths.sum()} real tokens, CPUs "
          f"{sorted(os.sched_getaffinity(0))}")
    for bs in args.batch_sizes:
        st_tokens = sum(len(lengths[i:i + bs]) * lengths[i] for i in range(0, len(lengths), bs))
        times, embs = {}, {}
        for name, fn in ladders.items():
            enc.bucket_lengths = fn
            buckets = fn(256)
            ours = sum(enc._rows_bucket(len(lengths[i:i + bs]), bs) * enc.bucket_length(lengths[i], buckets)
                       for i in range(0, len(lengths), bs))
            print(f"batch {bs} {name}: padded tokens {ours} ({ours / lengths.sum():.2f}x real; "
                  f"sentence-transformers {st_tokens / lengths.sum():.2f}x)")
            enc.encode(sentences, model, batch_size=bs)  # compile every shape
        for p_ in range(args.passes):
            for name in (list(ladders) if p_ % 2 == 0 else list(ladders)[::-1]):
                enc.bucket_lengths = ladders[name]
                t0 = time.perf_counter()
                embs[name] = enc.encode(sentences, model, batch_size=bs)
                times.setdefault(name, []).append(time.perf_counter() - t0)
        for name in ladders:
            print(f"batch {bs} {name}: {args.n / np.median(times[name]):.0f} sentences/s median, "
                  f"{args.n / min(times[name]):.0f} best")
        a, b = ladders
        print(f"batch {bs}: fine/repo throughput {np.median(times[a]) / np.median(times[b]):.2f}x (median), "
              f"max |embedding diff| {np.abs(embs[a] - embs[b]).max():.1e}")


if __name__ == "__main__":
    main()
