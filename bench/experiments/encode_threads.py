#!/usr/bin/env python
"""Experiment: embedding 2,048 sorted Quora questions in batches of 32 from one thread (each call
waited for), from 2 or 3 threads at once, and as one program holding two half batches.

    .venv/bin/python bench/experiments/encode_threads.py
"""
import sys
import time, threading
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax, common, minilm_jax
import importlib; E = importlib.import_module("minilm_jax.encode")
from minilm_jax.tokenizer import pad_batch
model = minilm_jax.load(common.default_model_path())
s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
sents = list(dict.fromkeys(s1))[:2048]
ids = model.tokenizer.token_ids(sents); ids = sorted(ids, key=len, reverse=True)
bs = 32
f = E._embed_fn(model.config, "float32", True)
batches = []
for i in range(0, len(ids), bs):
    rows = ids[i:i+bs]; L = max(len(r) for r in rows); L = -(-L // 8) * 8
    batches.append(pad_batch(rows, L, bs, 0))
for b in batches: f(model.params, *b).block_until_ready()
def seq():
    for b in batches: f(model.params, *b).block_until_ready()
def asyn():
    out = [f(model.params, *b) for b in batches]; jax.block_until_ready(out)
def threads(n):
    def work(k):
        for b in batches[k::n]: f(model.params, *b).block_until_ready()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    [t.start() for t in ts]; [t.join() for t in ts]
import collections; R = collections.defaultdict(list)
for name, fn in [("seq", seq), ("2threads", lambda: threads(2)), ("3threads", lambda: threads(3))] * 5:
    t = time.perf_counter(); fn(); s = time.perf_counter() - t
    R[name].append(len(sents)/s)
for k, v in R.items(): print(k, [round(x) for x in v], "median", round(sorted(v)[2]))
import jax.numpy as jnp
from minilm_jax.embedding import sentence_embeddings
def split2(params, ids, mask):
    h = ids.shape[0] // 2
    a = sentence_embeddings(params, ids[:h], mask[:h], config=model.config)
    b = sentence_embeddings(params, ids[h:], mask[h:], config=model.config)
    return jnp.concatenate([a, b])
g = jax.jit(split2)
for b in batches: g(model.params, *b).block_until_ready()
def seqsplit():
    for b in batches: g(model.params, *b).block_until_ready()
R = collections.defaultdict(list)
for name, fn in [("seq", seq), ("split2-in-one-program", seqsplit), ("2threads", lambda: threads(2))] * 5:
    t = time.perf_counter(); fn(); s = time.perf_counter() - t
    R[name].append(len(sents)/s)
for k, v in R.items(): print(k, [round(x) for x in v], "median", round(sorted(v)[2]))
