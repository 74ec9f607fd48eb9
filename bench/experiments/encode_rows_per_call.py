#!/usr/bin/env python
"""Experiment: minilm_jax.encode's throughput at several batch sizes, interleaved, in one process
(2,000 distinct Quora questions), with encode's CPU cap on rows per device call lifted, so that each
batch size is one device call: how the cap of 32 was chosen.

    .venv/bin/python bench/experiments/encode_rows_per_call.py
"""
import sys
import time, collections, importlib
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import numpy as np, common, minilm_jax
E = importlib.import_module("minilm_jax.encode")
E._CPU_ROWS_PER_CALL = 10**6  # lifted: every batch is one device call
model = minilm_jax.load(common.default_model_path())
s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
sents = list(dict.fromkeys(s1))[:2000]
bss = [16, 32, 64, 128]
for b in bss: E.encode(sents, model, batch_size=b)
R = collections.defaultdict(list)
for _ in range(5):
    for b in bss:
        t = time.perf_counter(); E.encode(sents, model, batch_size=b); R[b].append(len(sents) / (time.perf_counter() - t))
print({k: round(float(np.median(v))) for k, v in R.items()})
