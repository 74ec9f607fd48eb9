#!/usr/bin/env python
"""Experiment: the train step (batch 16, one packed shape, real weights) compiled with different
XLA:CPU options in one process (jit(...).lower(...).compile(compiler_options=...)), timed in turns.

    .venv/bin/python bench/experiments/xla_flags_step.py
"""
import sys
import time, collections
from pathlib import Path
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax, numpy as np
import common
from minilm_jax import data as data_lib, train_lib
model, tokens, sched, tx = common.quora_step_setup()
fn = train_lib.compiled_train_steps(1, config=model.config, tx=tx, schedule=sched)
groups = [a for _, _, a in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), 42, 0, 200, 1)]
shape = collections.Counter(a["ids"].shape for a in groups).most_common(1)[0][0]
batches = [a for a in groups if a["ids"].shape == shape][:12]
rng = jax.random.PRNGKey(0)
st0 = train_lib.init_state(model.params, tx)
variants = {"default": {}, "xnnpack off": {"xla_cpu_use_xnnpack": False},
            "xnn greedy": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
            "onednn": {"xla_cpu_use_onednn": True}}
compiled = {}
for name, opts in variants.items():
    try:
        compiled[name] = fn.lower(train_lib.to_devices(st0, 1), batches[0], rng).compile(compiler_options=opts)
    except Exception as e:
        print(name, "failed", str(e)[:200])
states = {n: train_lib.to_devices(st0, 1) for n in compiled}
R = collections.defaultdict(list)
for p in range(4):
    for n, c in compiled.items():
        t = time.perf_counter()
        for b in batches:
            states[n], m = c(states[n], b, rng)
        jax.block_until_ready(m)
        R[n].append((time.perf_counter() - t) / len(batches) * 1e3)
for n, v in R.items(): print(f"{n:12s} median {np.median(v):.0f} ms/step", [round(x) for x in v])
