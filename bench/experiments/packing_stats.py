#!/usr/bin/env python
"""Experiment (no model run): computed/real tokens and the number of distinct packed shapes over one
epoch of quora_train.tsv at batch 16, for data.ROW_MULTIPLE 4, 2, 1 and 1 or 16 steps per dispatch.

    .venv/bin/python bench/experiments/packing_stats.py
"""
import sys
import collections, numpy as np
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common, minilm_jax
from minilm_jax import data as D
from minilm_jax.pairs import Pairs
tok = minilm_jax.load(common.default_model_path()).tokenizer
s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
data = D.tokenize_pairs(Pairs(s1, s2, np.asarray(sc, np.float64)), tok)
n = D.steps_per_epoch(len(data), 16)
for K in (1, 16):
    for rm in (4, 2, 1):
        D.ROW_MULTIPLE = rm
        real = work = 0; shapes = collections.Counter()
        for first, k, a in D.dispatch_groups(data, D.BatchLayout(16), 42, 0, n, K):
            real += (a["segments"] > 0).sum(); work += a["ids"].size; shapes[a["ids"].shape[-2:]] += 1
        print(f"K={K} RM={rm} work/real {work/real:.3f} shapes {len(shapes)}; >=1% of dispatches: {sum(1 for v in shapes.values() if v >= 0.01*sum(shapes.values()))}", flush=True)
