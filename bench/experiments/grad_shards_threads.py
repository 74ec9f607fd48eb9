#!/usr/bin/env python
"""Experiment: a batch-16 step as one jitted program against two half-batch gradient programs run
from two threads at once, then one jitted clip+AdamW on their sum.

    .venv/bin/python bench/experiments/grad_shards_threads.py
"""
import sys
import time, functools, collections
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax, jax.numpy as jnp, numpy as np, optax
import common
from minilm_jax import data as D, train_lib as T
from minilm_jax.embedding import packed_sentence_embeddings
from minilm_jax.losses import cosine_mse_terms
steps, bs = 24, 16
model, tokens, sched, tx = common.quora_step_setup(batch_size=bs, total_steps=steps)
kw = dict(config=model.config, tx=tx, schedule=sched, dtype_name="float32", dropout=True)
rng = jax.random.PRNGKey(42)
# A: one jit step
jstep = jax.jit(functools.partial(T.train_step, axis_name=None, **kw), donate_argnums=(0,))
g1 = [ {k: v[0, 0] for k, v in a.items()} for _, _, a in D.dispatch_groups(tokens, D.BatchLayout(bs), 42, 0, steps, 1)]
# B: 2 shards
g2 = [ {k: v[:, 0] for k, v in a.items()} for _, _, a in D.dispatch_groups(tokens, D.BatchLayout(bs, 2, 2, 0), 42, 0, steps, 1)]
def loss_fn(params, batch, rng):
    b = batch["labels"].shape[0]
    emb = packed_sentence_embeddings(params, batch, 2 * b, config=model.config, dtype=jnp.float32, dropout_rng=rng)
    return jnp.sum(cosine_mse_terms(emb[:b], emb[b:], batch["labels"], batch["weights"])) / batch["count"]
grad_fn = jax.jit(jax.value_and_grad(loss_fn))
@functools.partial(jax.jit, donate_argnums=(0,))
def apply(state, ga, gb):
    grads = jax.tree.map(jnp.add, ga, gb)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    return T.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt)
pool = __import__("concurrent.futures").futures.ThreadPoolExecutor(2)
def stepB(state, batch):
    futs = [pool.submit(lambda d: jax.block_until_ready(grad_fn(state.params, {k: v[d] for k, v in batch.items()}, jax.random.fold_in(rng, d))), d) for d in range(2)]
    (la, ga), (lb, gb) = [f.result() for f in futs]
    return apply(state, ga, gb), la + lb
def runA(st):
    for b in g1: st, m = jstep(st, b, rng)
    jax.block_until_ready(m); return st
def runB(st):
    for b in g2: st, l = stepB(st, b)
    jax.block_until_ready(st); return st
stA = T.init_state(jax.tree.map(jnp.array, model.params), tx)
stB = T.init_state(jax.tree.map(jnp.array, model.params), tx)
stA = runA(stA); stB = runB(stB)
R = collections.defaultdict(list)
for _ in range(4):
    t = time.perf_counter(); stA = runA(stA); R["A jit"].append((time.perf_counter()-t)/steps*1e3)
    t = time.perf_counter(); stB = runB(stB); R["B 2 threads"].append((time.perf_counter()-t)/steps*1e3)
for k, v in R.items(): print(k, [round(x) for x in v], "median", round(float(np.median(v))))
