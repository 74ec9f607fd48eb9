#!/usr/bin/env python
"""Experiment: the train step with a dense word-embedding gradient (optax.chain(clip_by_global_norm,
adamw) over every parameter, as train.py ran before optimizer.py) against the row-sparse one
(train_lib.train_step), same batches (the most common packed shape at batch 16), interleaved
passes, time per step; then the two trainings' losses and parameters after those steps.

    .venv/bin/python bench/experiments/sparse_table.py [--passes 5]
"""
import argparse
import collections
import functools
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import common  # noqa: E402
from minilm_jax import data as data_lib, train_lib  # noqa: E402
from minilm_jax.embedding import packed_sentence_embeddings  # noqa: E402
from minilm_jax.losses import cosine_mse_terms  # noqa: E402


def dense_step(state, batch, rng, *, config, tx, schedule):
    """train_lib.train_step before the row-sparse table (one device, no axis)."""
    step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), 0)
    b = batch["labels"].shape[0]

    def loss_fn(params):
        emb = packed_sentence_embeddings(params, batch, 2 * b, config=config, dropout_rng=step_rng)
        return jnp.sum(cosine_mse_terms(emb[:b], emb[b:], batch["labels"], batch["weights"])) / batch["count"]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = train_lib.TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per pass and variant (default: %(default)s)")
    args = p.parse_args()
    model, tokens, sched, tx = common.quora_step_setup()
    cfg = train_lib.TrainConfig()
    dense_tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                           optax.adamw(sched, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                                       weight_decay=cfg.weight_decay))
    fns = {
        "dense table gradient": jax.jit(functools.partial(dense_step, config=model.config, tx=dense_tx,
                                                          schedule=sched), donate_argnums=0),
        "row-sparse (train_lib)": jax.jit(functools.partial(train_lib.train_step, config=model.config, tx=tx,
                                                            schedule=sched, axis_name=None), donate_argnums=0),
    }
    groups = [a for _, _, a in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), 42, 0, 200, 1)]
    shape = collections.Counter(a["ids"].shape for a in groups).most_common(1)[0][0]
    batches = [{k: v[0, 0] for k, v in a.items()} for a in groups if a["ids"].shape == shape][:args.steps]
    rng = jax.random.PRNGKey(0)
    params = jax.tree.map(jnp.array, model.params)

    def fresh_states():  # copies: each step donates its state
        return {"dense table gradient": train_lib.TrainState(jnp.zeros((), jnp.int32),
                                                             jax.tree.map(jnp.array, params), dense_tx.init(params)),
                "row-sparse (train_lib)": train_lib.init_state(jax.tree.map(jnp.array, params), tx)}

    states = fresh_states()
    print(f"machine: {common.machine_line()}; minilm-jax {common.repo_version()}; packed shape {shape[-2:]}, "
          f"{len(batches)} steps per pass")
    losses = collections.defaultdict(list)
    for name, f in fns.items():
        t = time.perf_counter()
        s, m = f(states[name], batches[0], rng)
        jax.block_until_ready(m)
        print(f"{name}: compile + 1 step {time.perf_counter() - t:.1f} s")
    states = fresh_states()  # the same starting point for both, then the same batches in the same order
    times = collections.defaultdict(list)
    for _ in range(args.passes):
        for name, f in fns.items():
            t = time.perf_counter()
            for b in batches:
                states[name], m = f(states[name], b, rng)
                losses[name].append(m["loss"])
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t) / len(batches) * 1e3)
    for name, v in times.items():
        print(f"{name:24s} median {np.median(v):.0f} ms/step  passes {[round(x) for x in v]}")
    (a, b) = (np.asarray(losses[n]) for n in fns)
    print(f"after {len(a)} steps: largest relative loss difference {np.max(np.abs(a - b) / np.abs(a)):.2e}")
    pa, pb = (jax.tree.leaves(states[n].params) for n in fns)
    print(f"largest |parameter difference| {max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(pa, pb)):.2e}")


if __name__ == "__main__":
    main()
