#!/usr/bin/env python
"""Search an embedded corpus (embed_corpus.py's folder) on the devices with a file of queries.

    python search.py --corpus corpus/ --queries questions.txt --top-k 10 --output hits.jsonl
    python search.py --corpus corpus/ --queries queries.jsonl --column text --score-function dot
    python search.py --corpus corpus/ --queries query_embeddings.npy

Queries: a text file (one a line), .jsonl/.tsv/.csv/.parquet with --column (embedded with the
corpus's model, checked by its fingerprint), or a .npy of float32 [Q, D] query embeddings.
The output (default: stdout) is JSON Lines, one line a query in order:
{"query": i, "hits": [{"corpus_id": row, "score": s}, ...]}, with the corpus's row numbers. A corpus
embedded with --id-column adds each hit's "id"; queries read with --id-column add "query_id".

The corpus is placed on every local device at its stored precision, in chunks of --chunk-rows;
int8/uint8/binary/ubinary corpora are searched and rescored as sentence-transformers'
semantic_search_faiss/usearch do (--rescore-multiplier, --no-rescore).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minilm_jax.errors import UsageError, UserError, cli_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from minilm_jax.search import DEFAULT_CHUNK_ROWS, DEFAULT_QUERY_CHUNK, SCORE_FUNCTIONS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="an embedded corpus folder (embed_corpus.py)")
    p.add_argument("--queries", required=True, nargs="+", help="query texts (files or globs) or one .npy of embeddings")
    p.add_argument("--column", default="text", help="the text column of .jsonl/.tsv/.csv/.parquet (default: %(default)s)")
    p.add_argument("--id-column", default=None,
                   help="a column of the query files whose values are given as each line's query_id")
    p.add_argument("--model", default=None,
                   help="model folder for the query texts (default: the corpus's, from its manifest)")
    p.add_argument("--top-k", type=int, default=10, help="default: %(default)s")
    p.add_argument("--score-function", default="cosine", choices=SCORE_FUNCTIONS, help="default: %(default)s")
    p.add_argument("--no-rescore", dest="rescore", action="store_false",
                   help="quantized corpora: keep the first stage's ranking (no float rescoring)")
    p.add_argument("--rescore-multiplier", type=int, default=2, help="candidates per hit to rescore (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                   help="corpus rows per device call; device memory holds one [query chunk, chunk rows] score matrix "
                   "(default: %(default)s)")
    p.add_argument("--query-chunk-size", type=int, default=DEFAULT_QUERY_CHUNK, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="query embedding batch size (default: %(default)s)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--output", default=None, help="hits file (.jsonl; default: stdout)")
    return p


def _query_embeddings(args, corpus):
    """(query embeddings, the queries' ids or None)."""
    import numpy as np

    if len(args.queries) == 1 and args.queries[0].endswith(".npy"):
        if args.id_column is not None:
            raise UsageError("--id-column names a column of query files; a .npy of query embeddings has none")
        try:
            return np.load(args.queries[0], allow_pickle=False), None
        except (OSError, ValueError) as e:
            raise UserError(f"--queries {args.queries[0]} is not a readable .npy file ({e})") from None
    import minilm_jax
    from minilm_jax.corpus import TextSource, model_fingerprint

    model = minilm_jax.load(args.model if args.model is not None else corpus.manifest["model"]["path"])
    if model_fingerprint(model) != corpus.manifest["model"]["fingerprint"]:
        raise UserError(f"{args.corpus} was embedded by another model ({corpus.manifest['model']['path']}) than "
                        f"{model.path}; embed the queries with the corpus's model")
    rows = list(TextSource.of(args.queries, args.column, args.id_column).rows())
    embeddings = minilm_jax.encode([text for text, _ in rows], model, batch_size=args.batch_size, devices=args.devices)
    return embeddings, None if args.id_column is None else [id_ for _, id_ in rows]


def _hits_line(i: int, query_ids, rows: list, scores: list, ids) -> dict:
    hits = [{"corpus_id": c, "score": s} for c, s in zip(rows, scores)]
    if ids is not None:
        for hit, id_ in zip(hits, ids):
            hit["id"] = id_
    return {"query": i, **({"query_id": query_ids[i]} if query_ids is not None else {}), "hits": hits}


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("top_k", "rescore_multiplier", "chunk_rows", "query_chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    from minilm_jax.compilation_cache import enable_compilation_cache
    from minilm_jax.corpus import Corpus, atomic_write
    from minilm_jax.search import place_corpus, search

    enable_compilation_cache()
    corpus = Corpus.open(args.corpus)
    queries, query_ids = _query_embeddings(args, corpus)
    placed = place_corpus(corpus, chunk_rows=args.chunk_rows, devices=args.devices)
    scores, rows = search(queries, placed, args.top_k, args.score_function, args.rescore, args.rescore_multiplier,
                          args.query_chunk_size)
    ids = corpus.ids_of(rows).tolist() if corpus.id_column is not None else None
    lines = "".join(json.dumps(_hits_line(i, query_ids, rows_i, scores_i, None if ids is None else ids[i])) + "\n"
                    for i, (rows_i, scores_i) in enumerate(zip(rows.tolist(), scores.tolist())))
    if args.output is None:
        sys.stdout.write(lines)
    else:
        atomic_write(os.path.abspath(args.output), lines.encode())


if __name__ == "__main__":
    sys.exit(main())
