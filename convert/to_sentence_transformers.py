#!/usr/bin/env python
"""Convert a minilm-jax model folder to a sentence-transformers folder (classic layout,
loadable by sentence-transformers 2.x to 6.x).

    python convert/to_sentence_transformers.py SRC OUT [--overwrite]
"""

import sys

from _cli import run

from minilm_jax.checkpoint_io import save_sentence_transformers
from minilm_jax.errors import cli_main


@cli_main
def main(argv=None):
    run(argv, __doc__, "minilm-jax", save_sentence_transformers)


if __name__ == "__main__":
    sys.exit(main())
