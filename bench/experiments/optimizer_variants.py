#!/usr/bin/env python
"""Experiment: the optimizer part of our step alone (22.7 M parameters, a fixed gradient, state
donated), as train_lib builds it and in variants: without the non-finite guard (jnp.where over
params and optimizer state), optax.adam instead of adamw (weight decay 0), and a hand-fused AdamW
(one expression per leaf). Reports XLA's bytes accessed and the measured time (interleaved, median).

    .venv/bin/python bench/experiments/optimizer_variants.py [--affinity 0]
"""
import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--affinity", default=None)
    args = p.parse_args()
    common.offline_env()
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import minilm_jax
    from minilm_jax import train_lib

    model = minilm_jax.load(common.default_model_path())
    params = jax.tree.map(jnp.asarray, model.params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    sched = optax.linear_schedule(5e-5, 0.0, 100_000)
    cfg = train_lib.TrainConfig()

    def chain_step(tx, guard):
        def f(state, g):
            p_, o = state
            u, o2 = tx.update(g, o, p_)
            p2 = optax.apply_updates(p_, u)
            if guard:  # as train_lib.train_step
                finite = jnp.isfinite(optax.global_norm(g))
                keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
                p2, o2 = keep(p2, p_), keep(o2, o)
            return p2, o2
        return f

    def fused_step(guard, b1=0.9, b2=0.999, eps=1e-8):
        def f(state, g):
            p_, (count, mu, nu) = state
            norm = optax.global_norm(g)
            scale = jnp.where(norm > 1.0, 1.0 / norm, 1.0)
            finite = jnp.isfinite(norm) if guard else jnp.bool_(True)
            c = (count + 1).astype(jnp.float32)
            bc1, bc2, lr = 1 - b1 ** c, 1 - b2 ** c, sched(count)

            def leaf(w, gr, m, v):
                gr = gr * scale
                m2 = b1 * m + (1 - b1) * gr
                v2 = b2 * v + (1 - b2) * gr * gr
                w2 = w - lr * (m2 / bc1) / (jnp.sqrt(v2 / bc2) + eps)
                if guard:
                    return jnp.where(finite, w2, w), jnp.where(finite, m2, m), jnp.where(finite, v2, v)
                return w2, m2, v2

            out = jax.tree.map(leaf, p_, g, mu, nu)
            pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=lambda t: isinstance(t, tuple))  # noqa: E731
            return pick(0), (jnp.where(finite, count + 1, count), pick(1), pick(2))
        return f

    def cond_guarded(inner):
        """The guard as lax.cond: the update runs only when the gradient norm is finite."""
        def f(state, g):
            finite = jnp.isfinite(optax.global_norm(g))
            return jax.lax.cond(finite, lambda s: inner(s, g), lambda s: s, state)
        return f

    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    variants = {}
    for name, tx in (("clip+adamw (train_lib)", train_lib.make_optimizer(cfg, sched)),
                     ("clip+adam (no weight-decay term)",
                      optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched)))):
        for guard in (True, False):
            variants[f"{name}, guard {'on' if guard else 'off'}"] = (
                jax.jit(chain_step(tx, guard), donate_argnums=0), lambda tx=tx: (jax.tree.map(jnp.array, params),
                                                                                 tx.init(params)))
    for guard in (True, False):
        variants[f"hand-fused adamw, guard {'on' if guard else 'off'}"] = (
            jax.jit(fused_step(guard), donate_argnums=0),
            lambda: (jax.tree.map(jnp.array, params), (jnp.zeros((), jnp.int32), zeros(), zeros())))
    variants["clip+adamw (train_lib), guard as lax.cond"] = (
        jax.jit(cond_guarded(chain_step(train_lib.make_optimizer(cfg, sched), False)), donate_argnums=0),
        lambda: (jax.tree.map(jnp.array, params), train_lib.make_optimizer(cfg, sched).init(params)))
    variants["hand-fused adamw, guard as lax.cond"] = (
        jax.jit(cond_guarded(fused_step(False)), donate_argnums=0),
        lambda: (jax.tree.map(jnp.array, params), (jnp.zeros((), jnp.int32), zeros(), zeros())))
    states, costs, times = {}, {}, {n: [] for n in variants}
    for name, (f, init) in variants.items():
        states[name] = init()
        c = f.lower(states[name], grads).compile()
        ca = c.cost_analysis()
        costs[name] = (ca[0] if isinstance(ca, list) else ca).get("bytes accessed", 0)
        states[name] = f(states[name], grads)
        jax.block_until_ready(states[name])
    for p_ in range(args.passes):
        for name in (list(variants) if p_ % 2 == 0 else list(variants)[::-1]):
            f = variants[name][0]
            t0 = time.perf_counter()
            for _ in range(args.calls):
                states[name] = f(states[name], grads)
            jax.block_until_ready(states[name])
            times[name].append(1000 * (time.perf_counter() - t0) / args.calls)
    print(f"machine: {common.machine_line()}; CPUs {sorted(os.sched_getaffinity(0))}")
    print(f"| {'optimizer variant':44s} | GB accessed | ms/update median | min |")
    print(f"|{'-' * 46}|-------------|------------------|-----|")
    for name in variants:
        print(f"| {name:44s} | {costs[name] / 1e9:11.2f} | {np.median(times[name]):16.1f} | {min(times[name]):.1f} |")


if __name__ == "__main__":
    main()
