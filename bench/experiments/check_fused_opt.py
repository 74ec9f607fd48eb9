#!/usr/bin/env python
"""Check: profile_step.fused_opt_train_step gives the same parameters as train_lib.train_step
(one device, dropout off) after a few real steps, and skips a non-finite step like the jnp.where guard.

    .venv/bin/python bench/experiments/check_fused_opt.py
"""
import functools
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import common  # noqa: E402


def main():
    common.offline_env()
    import jax
    import jax.numpy as jnp
    import numpy as np

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib
    from minilm_jax.pairs import Pairs
    from profile_step import fused_opt_init, fused_opt_train_step

    model = minilm_jax.load(common.default_model_path())
    s1, s2, sc = common.read_pairs_tsv(common.default_data_dir() / "quora_train.tsv")
    tokens = data_lib.tokenize_pairs(Pairs(s1[:2000], s2[:2000], np.asarray(sc[:2000])), model.tokenizer)
    groups = [jax.tree.map(lambda x: x[0, 0], g[2])
              for g in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), 42, 0, 4, 1)]
    cfg = train_lib.TrainConfig()
    sched = train_lib.learning_rate_schedule(cfg, 10)
    tx = train_lib.make_optimizer(cfg, sched)
    ref = jax.jit(functools.partial(train_lib.train_step, config=model.config, tx=tx, schedule=sched, dropout=False,
                                    axis_name=None))
    new = jax.jit(functools.partial(fused_opt_train_step, config=model.config, schedule=sched, dropout=False))
    rng = jax.random.PRNGKey(0)
    a, b = train_lib.init_state(model.params, tx), fused_opt_init(model.params)
    for batch in groups:
        a, ma = ref(a, batch, rng)
        b, mb = new(b, batch, rng)
        diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
        print(f"step {int(a.step)}: loss {float(ma['loss']):.6f} vs {float(mb['loss']):.6f}, "
              f"max |param diff| {diff:.2e}")
    bad = dict(groups[0], labels=jnp.asarray(groups[0]["labels"]).at[0].set(jnp.nan))
    b2, mb = new(b, bad, rng)
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(b2.params)))
    print(f"non-finite step: finite={bool(mb['finite'])}, params unchanged: {same}")


if __name__ == "__main__":
    main()
