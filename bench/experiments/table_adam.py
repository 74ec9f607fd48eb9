#!/usr/bin/env python
"""Experiment: AdamW on the 30,522 x 384 word-embedding table alone, as the step does it (scatter
the token gradients into a zero table, then Adam over every row) against a lazy exact form
(Adam with a zero gradient over every row, then the touched rows recomputed and scattered).

    .venv/bin/python bench/experiments/table_adam.py
"""
import time, functools, jax, jax.numpy as jnp, numpy as np
V, D, N = 30522, 384, 530
rng = np.random.default_rng(0)
p = jnp.asarray(rng.standard_normal((V, D)), jnp.float32) * 0.05
m = jnp.asarray(rng.standard_normal((V, D)), jnp.float32) * 1e-4
v = jnp.abs(jnp.asarray(rng.standard_normal((V, D)), jnp.float32)) * 1e-8
ids = jnp.asarray(rng.integers(0, 5000, N), jnp.int32)
g = jnp.asarray(rng.standard_normal((N, D)), jnp.float32) * 1e-3
b1, b2, eps, lr, t = 0.9, 0.999, 1e-8, 5e-5, 10
bc1, bc2 = 1 - b1**t, 1 - b2**t
def adam(p, m, v, g):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return p - lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps)), m, v
@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def dense(p, m, v, ids, g):
    G = jnp.zeros_like(p).at[ids].add(g)
    return adam(p, m, v, G)
@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def lazy(p, m, v, ids, g):
    u, inv = jnp.unique(ids, return_inverse=True, size=ids.shape[0], fill_value=V)
    rows = jax.ops.segment_sum(g, inv.reshape(-1), num_segments=ids.shape[0])
    uc = jnp.minimum(u, V - 1)
    pr, mr, vr = adam(p[uc], m[uc], v[uc], rows)
    p2, m2, v2 = adam(p, m, v, 0.0)
    return p2.at[u].set(pr, mode="drop"), m2.at[u].set(mr, mode="drop"), v2.at[u].set(vr, mode="drop")
ref = dense(p.copy(), m.copy(), v.copy(), ids, g)
out = lazy(p.copy(), m.copy(), v.copy(), ids, g)
print("max diff", [float(jnp.max(jnp.abs(a - b))) for a, b in zip(ref, out)], [bool(jnp.array_equal(a, b)) for a, b in zip(ref, out)])
for name, f in [("dense", dense), ("lazy", lazy)] * 2:
    st = (p.copy(), m.copy(), v.copy())
    st = f(*st, ids, g); jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(20): st = f(*st, ids, g)
    jax.block_until_ready(st)
    print(name, f"{(time.perf_counter()-t0)/20*1e3:.1f} ms")
