#!/usr/bin/env python
"""Experiment: one dropout mask and its select, as Flax's nn.Dropout draws it (jax.random.bernoulli:
JAX's Threefry, lowered on CPU as a rolled loop) against minilm_jax.dropout.dropout (the same hash
written out, fused into one loop), for the two mask shapes of a batch-16 step.

    .venv/bin/python bench/experiments/dropout_mask.py
"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minilm_jax.dropout import dropout

    def flax_like(x, key):  # what flax.linen.Dropout computes
        keep = jax.random.bernoulli(key, 0.9, x.shape)
        return jax.lax.select(keep, x / 0.9, jnp.zeros_like(x))

    for shape in [(8, 12, 64, 64), (8, 64, 384)]:
        x = jnp.ones(shape, jnp.float32)
        fns = {"jax.random.bernoulli": jax.jit(flax_like), "minilm_jax.dropout": jax.jit(lambda x, k: dropout(x, 0.1, k))}
        times = {name: [] for name in fns}
        for f in fns.values():
            f(x, jax.random.PRNGKey(0)).block_until_ready()
        for rep in range(5):
            for name, f in fns.items():
                t0 = time.perf_counter()
                for i in range(50):
                    y = f(x, jax.random.PRNGKey(i))
                y.block_until_ready()
                times[name].append((time.perf_counter() - t0) / 50 * 1e3)
        print(shape, ", ".join(f"{n}: {np.median(t):.2f} ms" for n, t in times.items()))


if __name__ == "__main__":
    main()
