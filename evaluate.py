#!/usr/bin/env python
"""Evaluate a model as sentence-transformers' evaluators do, with their metrics and key names.

    python evaluate.py --model PATH --pairs ../shared/data/stsb_dev.tsv [--similarity cosine dot] [--json]
    python evaluate.py --model PATH --pairs ../shared/data/quora_dev.tsv --evaluator binary
    python evaluate.py --model PATH --pairs ../shared/data/quora_dev.tsv --evaluator retrieval [--precision int8]
    python evaluate.py --model PATH --queries Q.jsonl --corpus C.jsonl --qrels R.tsv --evaluator retrieval
    python evaluate.py --model PATH --pairs ../shared/data/quora_dev.tsv --evaluator paraphrase-mining

Evaluators (minilm_jax/evaluators.py):
  similarity         EmbeddingSimilarityEvaluator: pearson and spearman of the similarity with the
                     gold scores (used as given: the correlations do not depend on their scale)
  binary             BinaryClassificationEvaluator: accuracy, F1, precision, recall, AP, MCC and the
                     thresholds; labels must be 0 or 1
  retrieval          InformationRetrievalEvaluator: accuracy/precision/recall@1,3,5,10, NDCG@10,
                     MRR@10, MAP@100. From --queries/--corpus/--qrels (BEIR's layout: `_id` or `id`
                     and `text`; `query-id`, `corpus-id`, optional `score`; .jsonl, .tsv or .csv), or
                     from --pairs: the queries are the sentence1 texts of the positive pairs, the
                     corpus is every distinct sentence2
  paraphrase-mining  ParaphraseMiningEvaluator over the distinct texts of both columns of --pairs,
                     the positive pairs being the duplicates (top_k 100, max_pairs 500,000)
A pair is positive when its score is >= --positive-threshold (default 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from minilm_jax.errors import UsageError, cli_main
from minilm_jax.quantize import PRECISIONS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as every usage error
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    from minilm_jax.evaluators import EVALUATORS
    from minilm_jax.metrics import SIMILARITY_FNS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder (sentence-transformers or minilm-jax); default: all-MiniLM-L6-v2")
    p.add_argument("--evaluator", default="similarity", choices=EVALUATORS, help="default: %(default)s")
    p.add_argument("--pairs", default=None, help="pairs file: .tsv, .csv, .jsonl or .parquet")
    p.add_argument("--sentence1-column", default="sentence1", help="default: %(default)s")
    p.add_argument("--sentence2-column", default="sentence2", help="default: %(default)s")
    p.add_argument("--score-column", default="score", help="default: %(default)s")
    p.add_argument("--queries", default=None, help="retrieval: queries file (`_id` or `id`, `text`)")
    p.add_argument("--corpus", default=None, help="retrieval: corpus file (`_id` or `id`, `text`, optional `title`)")
    p.add_argument("--qrels", default=None, help="retrieval: relevance file (`query-id`, `corpus-id`, optional `score`)")
    p.add_argument("--positive-threshold", type=float, default=None,
                   help="retrieval from --pairs and paraphrase-mining: a pair with score >= this is a positive "
                        "(default: 1)")
    p.add_argument("--similarity", nargs="+", default=None, choices=SIMILARITY_FNS,
                   help="similarity functions to report (default: the model's similarity_fn_name, cosine for "
                   "all-MiniLM-L6-v2; paraphrase-mining: cosine)")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype; default: %(default)s")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="retrieval: the corpus embeddings at this precision (quantize_embeddings; int8/uint8 ranges "
                   "from the corpus), searched with rescoring as search.py does (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = {"--queries": args.queries, "--corpus": args.corpus, "--qrels": args.qrels}
    given = [flag for flag, value in files.items() if value is not None]
    if given and args.evaluator != "retrieval":
        raise UsageError(f"{given[0]} is for --evaluator retrieval, not {args.evaluator}")
    if given and len(given) < 3:
        missing = [flag for flag in files if flag not in given]
        raise UsageError(f"--evaluator retrieval needs --queries, --corpus and --qrels together; add {', '.join(missing)}")
    if given and args.pairs is not None:
        raise UsageError("give --evaluator retrieval either --pairs or --queries/--corpus/--qrels, not both")
    if not given and args.pairs is None:
        raise UsageError("the following arguments are required: --pairs"
                         + (" (or --queries, --corpus and --qrels)" if args.evaluator == "retrieval" else "")
                         + " (see --help)")
    if args.positive_threshold is not None:
        if args.evaluator not in ("retrieval", "paraphrase-mining") or given:
            raise UsageError("--positive-threshold is for --evaluator retrieval with --pairs and for "
                             "--evaluator paraphrase-mining")
        if args.positive_threshold != args.positive_threshold:
            raise UsageError("--positive-threshold must be a number, got nan")
    return args


def _table(evaluator, metrics: dict) -> list[str]:
    if evaluator.name == "similarity":
        lines = [f"{'similarity':<12}{'pearson':>10}{'spearman':>10}"]
        for fn in evaluator.similarity_fns:
            lines.append(f"{fn:<12}{metrics[f'pearson_{fn}']:>10.6f}{metrics[f'spearman_{fn}']:>10.6f}")
        return lines
    if evaluator.name == "binary":
        keys = ("accuracy", "accuracy_threshold", "f1", "f1_threshold", "precision", "recall", "ap", "mcc")
        heads = ("accuracy", "threshold", "f1", "threshold", "precision", "recall", "ap", "mcc")
        lines = [f"{'similarity':<12}" + "".join(f"{h:>11}" for h in heads)]
        for fn in evaluator.similarity_fns + (("max",) if len(evaluator.similarity_fns) > 1 else ()):
            lines.append(f"{fn:<12}" + "".join(f"{metrics[f'{fn}_{k}']:>11.6f}" for k in keys))
        return lines
    width = max(len(k) for k in metrics) + 2
    return [f"{key:<{width}}{value:.6f}" + ("  (primary)" if key == evaluator.primary_metric else "")
            for key, value in metrics.items()]


def _describe(sizes: dict) -> str:
    words = {"pairs": "pairs", "queries": "queries", "corpus": "documents", "sentences": "sentences",
             "duplicates": "duplicate pairs"}
    return ", ".join(f"{n} {words[k]}" for k, n in sizes.items())


@cli_main
def main(argv=None) -> None:
    args = parse_args(argv)
    import minilm_jax
    from minilm_jax.compilation_cache import enable_compilation_cache
    from minilm_jax.evaluators import build_evaluator, load_retrieval

    enable_compilation_cache()
    from minilm_jax.pairs import Columns, load_pairs

    pairs = retrieval = None
    if args.pairs is not None:
        pairs = load_pairs(args.pairs, Columns(args.sentence1_column, args.sentence2_column, args.score_column))
        files = {"file": args.pairs}
    else:
        retrieval = load_retrieval(args.queries, args.corpus, args.qrels)
        files = {"queries_file": args.queries, "corpus_file": args.corpus, "qrels_file": args.qrels}
    threshold = 1.0 if args.positive_threshold is None else args.positive_threshold
    evaluator = build_evaluator(args.evaluator, pairs=pairs, retrieval=retrieval, similarity_fns=args.similarity,
                                positive_threshold=threshold, precision=args.precision)
    model = minilm_jax.load(args.model)
    if args.similarity is None and model.sentence.similarity_fn_name != "cosine":  # the model's, as ST's default
        evaluator = build_evaluator(args.evaluator, pairs=pairs, retrieval=retrieval, positive_threshold=threshold,
                                    model_similarity=model.sentence.similarity_fn_name, precision=args.precision)
    start = time.perf_counter()
    metrics = evaluator.evaluate(model, args.batch_size, args.dtype)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**metrics, **evaluator.sizes(), "model": model.path, **files}))
        return
    where = args.pairs if args.pairs is not None else args.qrels
    print(f"{where}: {_describe(evaluator.sizes())}, model {model.path} ({seconds:.1f} s)")
    for line in _table(evaluator, metrics):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
