#!/usr/bin/env python
"""Experiment: XLA's own cost analysis (FLOPs, bytes accessed, temp memory) of the pieces of our
train step and of variants, on one real packed batch of 16 pairs. Compile-only: independent of
other load on the machine. Bytes accessed is what makes the CPU step memory-bound.

    .venv/bin/python bench/experiments/step_costs.py [--batch-size 16]
"""
import argparse
import functools
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    common.offline_env()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib
    from minilm_jax.embedding import packed_sentence_embeddings
    from minilm_jax.losses import cosine_mse_terms
    from minilm_jax.pairs import Pairs

    model = minilm_jax.load(common.default_model_path())
    s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
    tokens = data_lib.tokenize_pairs(Pairs(s1, s2, np.asarray(sc)), model.tokenizer)
    _, _, arrays = next(data_lib.dispatch_groups(tokens, data_lib.BatchLayout(args.batch_size), 42, 0, 1, 1))
    ja = jax.tree.map(lambda x: x[0], arrays)
    one = jax.tree.map(lambda x: x[0], ja)
    cfg = train_lib.TrainConfig(batch_size=args.batch_size)
    sched = train_lib.learning_rate_schedule(cfg, 1000)
    tx = train_lib.make_optimizer(cfg, sched)
    kw = dict(config=model.config, tx=tx, schedule=sched)
    rng = jax.random.PRNGKey(0)
    st = train_lib.init_state(model.params, tx)
    params = model.params

    def loss_of(p_, b, r, dropout):
        n = b["labels"].shape[0]
        e = packed_sentence_embeddings(p_, b, 2 * n, config=model.config, dropout_rng=r if dropout else None)
        return jnp.sum(cosine_mse_terms(e[:n], e[n:], b["labels"], b["weights"])) / b["count"]

    def vg(p_, b, r, dropout):  # the step's gradient: the word-embedding table's row-sparse
        loss, g = train_lib.loss_and_grads(p_, b, r if dropout else None, config=model.config, axis_name=None)
        return loss, optax.tree.norm(g)

    _, grads = jax.jit(functools.partial(train_lib.loss_and_grads, config=model.config, axis_name=None))(
        params, one, None)

    def opt_step(state, g):
        new_params, opt_state, _ = tx.apply(g, state.opt_state, state.params)
        return train_lib.TrainState(step=state.step + 1, params=new_params, opt_state=opt_state)

    pmap_fn, place = common.pmap_one_device(**kw)
    cases = {
        "forward, dropout on": (jax.jit(functools.partial(loss_of, dropout=True)), (params, one, rng)),
        "forward, dropout off": (jax.jit(functools.partial(loss_of, dropout=False)), (params, one, rng)),
        "forward+backward, dropout on": (jax.jit(functools.partial(vg, dropout=True)), (params, one, rng)),
        "forward+backward, dropout off": (jax.jit(functools.partial(vg, dropout=False)), (params, one, rng)),
        "optimizer only (clip+adamw)": (jax.jit(opt_step, donate_argnums=0), (st, grads)),
        "full step, pmap on 1 device": (pmap_fn, (place(st), arrays, rng)),
        "full step, jit (train.py)": (jax.jit(functools.partial(train_lib.train_steps, axis_name=None, **kw), donate_argnums=0),
                           (st, ja, rng)),
        "full step, jit, no lax.scan": (jax.jit(functools.partial(train_lib.train_step, axis_name=None, **kw),
                                                donate_argnums=0), (st, one, rng)),
    }
    print(f"batch {args.batch_size}, packed shape {one['ids'].shape}, {int((one['segments'] > 0).sum())} real tokens")
    print(f"| {'variant':36s} | GFLOP | GB accessed | temp MB | while loops | copies MB |")
    print(f"|{'-' * 38}|-------|-------------|---------|-------------|-----------|")
    for name, (f, a) in cases.items():
        c = f.lower(*a).compile()
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        text = c.as_text()
        copied = 0
        for line in text.splitlines():
            if " copy(" in line and "= f32[" in line:
                dims = line.split("= f32[", 1)[1].split("]", 1)[0]
                copied += 4 * int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 4
        flops, traffic = ca.get("flops", 0) / 1e9, ca.get("bytes accessed", 0) / 1e9
        print(f"| {name:36s} | {flops:5.1f} | {traffic:11.2f} | "
              f"{c.memory_analysis().temp_size_in_bytes / 1e6:7.0f} | {text.count(' while('):11d} | "
              f"{copied / 1e6:9.0f} |")


if __name__ == "__main__":
    main()
