#!/usr/bin/env python
"""Correlation of a model's similarities with gold scores, as sentence-transformers'
EmbeddingSimilarityEvaluator computes it.

    python evaluate.py --model PATH --pairs ../shared/data/stsb_dev.tsv [--similarity cosine dot] [--json]

Scores are used as given (pearson and spearman do not depend on their scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from minilm_jax.errors import UsageError, cli_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every usage error
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    from minilm_jax.metrics import SIMILARITY_FNS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder (sentence-transformers or minilm-jax); default: all-MiniLM-L6-v2")
    p.add_argument("--pairs", required=True, help="pairs file: .tsv, .csv, .jsonl or .parquet")
    p.add_argument("--sentence1-column", default="sentence1", help="default: %(default)s")
    p.add_argument("--sentence2-column", default="sentence2", help="default: %(default)s")
    p.add_argument("--score-column", default="score", help="default: %(default)s")
    p.add_argument("--similarity", nargs="+", default=["cosine"], choices=SIMILARITY_FNS,
                   help="similarity functions to report (default: cosine)")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype; default: %(default)s")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    import minilm_jax
    from minilm_jax.compilation_cache import enable_compilation_cache
    from minilm_jax.metrics import evaluate_pairs

    enable_compilation_cache()
    from minilm_jax.pairs import Columns, load_pairs

    pairs = load_pairs(args.pairs, Columns(args.sentence1_column, args.sentence2_column, args.score_column))
    model = minilm_jax.load(args.model)
    start = time.perf_counter()
    metrics = evaluate_pairs(model, pairs, args.similarity, args.batch_size, args.dtype)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**metrics, "pairs": len(pairs), "model": model.path, "file": args.pairs}))
        return
    print(f"{args.pairs}: {len(pairs)} pairs, model {model.path} ({seconds:.1f} s)")
    print(f"{'similarity':<12}{'pearson':>10}{'spearman':>10}")
    for fn in args.similarity:
        print(f"{fn:<12}{metrics[f'pearson_{fn}']:>10.6f}{metrics[f'spearman_{fn}']:>10.6f}")


if __name__ == "__main__":
    sys.exit(main())
