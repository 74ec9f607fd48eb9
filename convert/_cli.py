"""Shared command line of the two converters: SRC OUT [--overwrite]."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minilm_jax.errors import UsageError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def run(argv, description: str, expected_kind: str, save) -> None:
    from minilm_jax import checkpoint_io

    p = _Parser(description=description)
    p.add_argument("src", help=f"a {expected_kind} model folder")
    p.add_argument("out", help="the folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    args = p.parse_args(argv)
    if os.path.abspath(args.src) == os.path.abspath(args.out):
        raise UsageError("SRC and OUT are the same folder; write the converted model elsewhere")
    kind = checkpoint_io.folder_kind(args.src)
    if kind != expected_kind:
        raise UsageError(f"{args.src} is a {kind} folder, not a {expected_kind} one; use the other converter")
    start = time.perf_counter()
    model = checkpoint_io.load_model(args.src)
    save(model, args.out, overwrite=args.overwrite)
    convert = checkpoint_io.convert
    n = len(convert.parameter_table(model.config)) + sum(len(convert.dense_table(i, dense))
                                                         for i, dense in enumerate(model.sentence.dense))
    stack = f" ({model.sentence.head.describe()})" if model.sentence.head != type(model.sentence.head)() else ""
    print(f"wrote {args.out}: {n} tensors{stack}, {time.perf_counter() - start:.1f} s")
