#!/usr/bin/env python
"""Experiment: query, key and value as one [D, 3D] matmul against three [D, D] Dense layers
(model.SelfAttention), in the whole train step and in the forward pass; same batches, interleaved
passes, median. The fused version is traced by swapping model.SelfAttention for the class below
while it compiles. Not kept: no difference (bench/RESULTS.md).

    .venv/bin/python bench/experiments/fused_qkv.py [--passes 5]
"""
import argparse
import collections
import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

import common  # noqa: E402
from minilm_jax import data as data_lib, model as model_lib, train_lib  # noqa: E402
from minilm_jax.config import BertConfig  # noqa: E402
from minilm_jax.dropout import Dropout  # noqa: E402
from minilm_jax.embedding import packed_sentence_embeddings  # noqa: E402


class _DenseParams(nn.Module):
    """A Dense layer's parameters under their usual names (kernel [in, out], bias [out])."""

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", model_lib._init, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        return kernel, bias


class FusedQKV(nn.Module):
    """model.SelfAttention with query, key and value computed as one [D, 3D] matmul; the
    parameters keep their names."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, bias_Bx1xLxL, deterministic: bool):
        c = self.config
        B, L, D = x_BxLxD.shape
        H, K = c.num_attention_heads, c.head_dim
        prec = model_lib._precision(self.dtype)
        kernels, biases = zip(*(_DenseParams(D, name=n)(D) for n in ("query", "key", "value")))
        qkv = jnp.einsum("bld,de->ble", x_BxLxD.astype(self.dtype), jnp.concatenate(kernels, axis=1).astype(self.dtype),
                         precision=prec) + jnp.concatenate(biases).astype(self.dtype)
        q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, L, H, K) for i in range(3))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32, precision=prec)
        probs = jax.nn.softmax(scores / jnp.sqrt(jnp.float32(K)) + bias_Bx1xLxL, axis=-1)
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.dtype), v, precision=prec).reshape(B, L, H * K)
        out = model_lib._dense(c.hidden_size, self.dtype, "output")(ctx).astype(jnp.float32)
        return Dropout(c.hidden_dropout_prob)(out, deterministic=deterministic)


@contextlib.contextmanager
def attention(cls):
    saved = model_lib.SelfAttention
    model_lib.SelfAttention = cls
    try:
        yield
    finally:
        model_lib.SelfAttention = saved


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    model, tokens, sched, tx = common.quora_step_setup()
    groups = [a for _, _, a in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), 42, 0, 200, 1)]
    shape = collections.Counter(a["ids"].shape for a in groups).most_common(1)[0][0]
    batches = [{k: v[0, 0] for k, v in a.items()} for a in groups if a["ids"].shape == shape][:args.steps]
    rng = jax.random.PRNGKey(0)
    step = functools.partial(train_lib.train_step, config=model.config, tx=tx, schedule=sched, axis_name=None)
    forward = functools.partial(packed_sentence_embeddings, n_sentences=32, config=model.config)
    variants = {"separate q, k, v (model.py)": model_lib.SelfAttention, "fused qkv": FusedQKV}
    compiled, states = {}, {}
    for name, cls in variants.items():
        with attention(cls):
            states[name] = train_lib.init_state(jax.tree.map(jnp.array, model.params), tx)
            compiled[name] = (jax.jit(step, donate_argnums=0).lower(states[name], batches[0], rng).compile(),
                              jax.jit(forward).lower(model.params, batches[0]).compile())
    print(f"machine: {common.machine_line()}; minilm-jax {common.repo_version()}; packed shape {shape[-2:]}")
    times = collections.defaultdict(list)
    outputs = {}
    for _ in range(args.passes):
        for name, (step_fn, fwd_fn) in compiled.items():
            t = time.perf_counter()
            for b in batches:
                states[name], m = step_fn(states[name], b, rng)
            jax.block_until_ready(m)
            times[name, "train step"].append((time.perf_counter() - t) / len(batches) * 1e3)
            t = time.perf_counter()
            for b in batches:
                outputs[name] = fwd_fn(model.params, b)
            jax.block_until_ready(outputs[name])
            times[name, "forward (no dropout)"].append((time.perf_counter() - t) / len(batches) * 1e3)
    for (name, what), v in sorted(times.items(), key=lambda kv: kv[0][1]):
        print(f"{what:22s} {name:28s} median {np.median(v):6.1f} ms  passes {[round(x, 1) for x in v]}")
    a, b = (np.asarray(outputs[n]) for n in variants)
    print(f"largest |embedding difference| between the two: {np.max(np.abs(a - b)):.2e}")


if __name__ == "__main__":
    main()
