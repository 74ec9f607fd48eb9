#!/usr/bin/env python
"""Embed a corpus of texts to disk: .npy shards and a corpus.json manifest (minilm_jax/corpus.py).

    python embed_corpus.py texts.txt --output-dir corpus/
    python embed_corpus.py 'data/*.jsonl' --column text --output-dir corpus/ --precision int8
    python embed_corpus.py questions.tsv --column sentence1 --output-dir corpus/ --precision ubinary
    python embed_corpus.py 'docs/*.parquet' --column body --id-column doc_id --output-dir corpus/

Inputs: .txt (one text a line), .jsonl, .tsv/.csv (with a header) or .parquet (the text in
--column), several files or globs, read as a stream in the order given. Every row is checked
before anything is embedded: an empty text or a missing column is an error naming the line.
With --id-column, each row's id (an integer or a string) is kept beside its embedding.

Every local device embeds (encode's batching); memory is bounded by --shard-rows, not by the
corpus. Run the same command again after a crash or kill: it goes on from the last complete shard,
and a finished corpus is not redone. A folder embedded by another model, at another precision or
from other texts is refused.

--precision float32|float16|int8|uint8|binary|ubinary: sentence-transformers' quantize_embeddings,
equal to its output. int8/uint8 take their ranges from --calibration (.npy: [2, D] ranges or
[N, D] embeddings), else from the first --calibration-rows texts of the corpus (ranges.npy).

Several hosts: start the same command on every host (--distributed, or --coordinator-address/
--num-processes/--process-id as train.py); shard i is embedded by process i mod N, into one
shared --output-dir. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minilm_jax import distributed
from minilm_jax.errors import UsageError, cli_main


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from minilm_jax.corpus_run import DEFAULT_BLOCK_ROWS, DEFAULT_CALIBRATION_ROWS, DEFAULT_SHARD_ROWS
    from minilm_jax.quantize import PRECISIONS

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or globs (.txt, .jsonl, .tsv, .csv, .parquet)")
    p.add_argument("--output-dir", required=True, help="the corpus folder (created; reused to resume)")
    p.add_argument("--column", default="text", help="the text column of .jsonl/.tsv/.csv/.parquet (default: %(default)s)")
    p.add_argument("--id-column", default=None,
                   help="a column of .jsonl/.tsv/.csv/.parquet whose values (integers or strings) are stored as the "
                   "rows' ids beside the embeddings, and given with search.py's hits (default: ids are row numbers)")
    p.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS, help="default: %(default)s")
    p.add_argument("--calibration", default=None, metavar="NPY",
                   help="int8/uint8: [2, D] ranges or [N, D] calibration embeddings (.npy)")
    p.add_argument("--calibration-rows", type=int, default=DEFAULT_CALIBRATION_ROWS,
                   help="int8/uint8 without --calibration: ranges from the first this many texts (default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per shard file (default: %(default)s)")
    p.add_argument("--block-rows", type=int, default=DEFAULT_BLOCK_ROWS,
                   help="texts per encode call, sorted by length within it (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per device per device call (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="matmul dtype (default: %(default)s)")
    p.add_argument("--devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("several processes (hosts): run the same command on every one")
    distributed.add_arguments(g)
    return p


@cli_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    several = distributed.parse_options(argv)
    if several.enabled and not distributed.is_worker():
        return distributed.supervise([sys.executable, os.path.abspath(__file__), *argv], several)
    args = build_parser().parse_args(argv)
    for name in ("shard_rows", "block_rows", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.calibration is not None and args.precision not in ("int8", "uint8"):
        raise UsageError(f"--calibration is for --precision int8 or uint8, not {args.precision}")
    with distributed.failures_reported(several):
        if several.enabled:
            distributed.initialize(several)
        import jax

        from minilm_jax.compilation_cache import enable_compilation_cache
        from minilm_jax.corpus import TextSource
        from minilm_jax.corpus_run import embed_corpus

        enable_compilation_cache()
        summary = embed_corpus(TextSource.of(args.inputs, args.column, args.id_column), args.output_dir, args.model, args.precision,
                               shard_rows=args.shard_rows, block_rows=args.block_rows, batch_size=args.batch_size,
                               dtype=args.dtype, devices=args.devices, calibration=args.calibration,
                               calibration_rows=args.calibration_rows,
                               progress=args.progress and jax.process_index() == 0,
                               process_index=jax.process_index(), process_count=jax.process_count())
    print(json.dumps(summary.as_dict()))


if __name__ == "__main__":
    sys.exit(main())
