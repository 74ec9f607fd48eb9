#!/usr/bin/env python
"""Experiment: one step per call against two steps per call (lax.scan, and lax.scan unrolled), time
per step, batch 16.

    .venv/bin/python bench/experiments/scan_unroll.py
"""
import sys
import time, functools, collections
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax, numpy as np
import common
from minilm_jax import data as data_lib, train_lib
model, tokens, sched, tx = common.quora_step_setup()
kw = dict(config=model.config, tx=tx, schedule=sched, axis_name=None)
def steps_unrolled(state, batches, rng):
    return jax.lax.scan(lambda c, b: train_lib.train_step(c, b, rng, **kw), state, batches, unroll=True)
fns = {"K1": jax.jit(functools.partial(train_lib.train_steps, **kw), donate_argnums=0),
       "K2 scan": jax.jit(functools.partial(train_lib.train_steps, **kw), donate_argnums=0),
       "K2 unrolled": jax.jit(steps_unrolled, donate_argnums=0)}
def batches_for(K):
    gs = [a for _, _, a in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), 42, 0, 400, K)]
    shape = collections.Counter(a["ids"].shape for a in gs).most_common(1)[0][0]
    return [{k: v[0] for k, v in a.items()} for a in gs if a["ids"].shape == shape][:12 // K]
B = {"K1": batches_for(1), "K2 scan": batches_for(2), "K2 unrolled": batches_for(2)}
rng = jax.random.PRNGKey(0)
st0 = train_lib.init_state(model.params, tx)
states = {n: train_lib.to_devices(st0, 1) for n in fns}
for n, f in fns.items():
    t = time.perf_counter(); states[n], m = f(states[n], B[n][0], rng); jax.block_until_ready(m); print(n, "compile+1", round(time.perf_counter()-t, 1), "s", B[n][0]["ids"].shape)
R = collections.defaultdict(list)
for p in range(4):
    for n, f in fns.items():
        t = time.perf_counter()
        for b in B[n]: states[n], m = f(states[n], b, rng)
        jax.block_until_ready(m)
        R[n].append((time.perf_counter() - t) / (len(B[n]) * b["ids"].shape[0] if n != "K1" else len(B[n])) * 1e3)
for n, v in R.items(): print(f"{n:12s} median {np.median(v):.0f} ms/step", [round(x) for x in v])
