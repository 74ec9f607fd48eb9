#!/usr/bin/env python
"""Convert a sentence-transformers model folder to a minilm-jax model folder.

    python convert/from_sentence_transformers.py SRC OUT [--overwrite]

Weights come from model.safetensors, or from pytorch_model.bin read without running pickled code.
"""

import sys

from _cli import run

from minilm_jax.checkpoint_io import save_minilm_jax
from minilm_jax.errors import cli_main


@cli_main
def main(argv=None):
    run(argv, __doc__, "sentence-transformers", save_minilm_jax)


if __name__ == "__main__":
    sys.exit(main())
