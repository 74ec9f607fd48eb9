#!/usr/bin/env python
"""Experiment: the batch-16 train step on 2 CPU cores as one device under plain jit (what train.py
runs) against 2 fake CPU devices under pmap (each device half the batch, gradients pmean'd).

    .venv/bin/python bench/experiments/cpu_devices.py jit 1
    .venv/bin/python bench/experiments/cpu_devices.py pmap 2      # [batch size, default 16]
Env: STEPS (default 24), RM (data.ROW_MULTIPLE, default 4 as when this ran; the repo now uses 1).
"""
import os, sys
import time, functools
from pathlib import Path
mode, ndev = sys.argv[1], int(sys.argv[2])
bs = int(sys.argv[3]) if len(sys.argv) > 3 else 16
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev} " + os.environ.get("XLA_FLAGS", "")
sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import common, minilm_jax
from minilm_jax import data as data_lib, train_lib
from minilm_jax.pairs import Pairs
model = minilm_jax.load(common.default_model_path())
s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
tokens = data_lib.tokenize_pairs(Pairs(s1[:4000], s2[:4000], np.asarray(sc[:4000], np.float64)), model.tokenizer)
steps = int(os.environ.get("STEPS", 24)); data_lib.ROW_MULTIPLE = int(os.environ.get("RM", 4))
cfg = train_lib.TrainConfig(batch_size=bs, max_steps=steps)
sched = train_lib.learning_rate_schedule(cfg, steps); tx = train_lib.make_optimizer(cfg, sched)
kw = dict(config=model.config, tx=tx, schedule=sched, dtype_name="float32", dropout=True)
n = jax.local_device_count()
layout = data_lib.BatchLayout(bs, n, n, 0)
groups = list(data_lib.dispatch_groups(tokens, layout, 42, 0, steps, 1))
rng = jax.random.PRNGKey(42)
if mode == "pmap":
    fn = train_lib.pmapped_train_steps(**kw); st = train_lib.replicate(train_lib.init_state(model.params, tx))
    call = lambda st, a: fn(st, a, rng)
else:
    j = jax.jit(functools.partial(train_lib.train_steps, axis_name=None, **kw), donate_argnums=(0,))
    st = train_lib.init_state(jax.tree.map(jax.numpy.array, model.params), tx)
    call = lambda st, a: j(st, {k: v[0] for k, v in a.items()}, rng)
for _, _, a in groups:
    st, m = call(st, a); jax.block_until_ready(m)
res = []
for p in range(3):
    t = time.perf_counter()
    for i, (_, _, a) in enumerate(groups):
        st, m = call(st, a)
        if i % 8 == 7: jax.block_until_ready(m)
    jax.block_until_ready(m); res.append((time.perf_counter() - t) / steps * 1e3)
print(mode, ndev, bs, "ms/step", [round(x) for x in res], "median", round(sorted(res)[1]), "load", os.getloadavg()[0])
