"""The recipe's optimizer, gradient-norm clipping then AdamW, for a model whose word-embedding
table gets a row-sparse gradient.

Why row-sparse: a batch of 16 pairs touches a few hundred of the table's 30,522 rows, but a dense
gradient costs a zero-filled 47 MB table, a scatter into it and Adam passes that read it: the
step took 334 ms with it and takes 305 without it on 2 CPU cores (bench/RESULTS.md).
`train_lib.loss_and_grads` differentiates with respect to the batch's rows only and hands them
over as a `RowSparse`.

The maths is optax's, to the rounding of a sum: the clip is `optax.clip_by_global_norm`, and AdamW
is optax.adamw's expressions, written once for a dense gradient and once for rows: a row without
gradient gets optax's zero-gradient update (mu*b1, nu*b2, and the parameter step those give), a
row with gradient the full one. Its settings and learning rate are values, so that they can be
inputs of a compiled step. tests/test_optimizer.py checks it against
`optax.chain(clip_by_global_norm, adamw)` with the dense gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

# Where the word-embedding table sits in the encoder's parameters.
TABLE_PATH = ("embeddings", "word_embeddings", "embedding")


@struct.dataclass
class RowSparse:
    """The gradient of a [V, D] table that only some rows received: values[i] is row rows[i]'s.

    rows [N] int32 are distinct; entries >= V are padding (a fixed N keeps shapes static), and
    their values must be zero.
    """

    rows: jax.Array
    values: jax.Array


@struct.dataclass
class OptState:
    count: jax.Array  # updates applied, as optax's ScaleByAdamState.count
    mu: Any  # first moments, shaped as the parameters (the table's too: dense)
    nu: Any  # second moments


def split_table(tree: dict, path: tuple[str, ...] = TABLE_PATH) -> tuple[dict, Any]:
    """(tree without the leaf at `path`, that leaf). Emptied sub-dicts are dropped."""
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"no {'/'.join(path)} in the parameters")
        node = node[key]
    return _without(tree, path), node


def _without(tree: dict, path: tuple[str, ...]) -> dict:
    head, *rest = path
    out = {k: v for k, v in tree.items() if k != head}
    if rest:
        inner = _without(tree[head], tuple(rest))
        if inner:
            out[head] = inner
    return out


def join_table(tree: dict, leaf: Any, path: tuple[str, ...] = TABLE_PATH) -> dict:
    """The inverse of split_table: `tree` with `leaf` put back at `path`."""
    head, *rest = path
    if not rest:
        return {**tree, head: leaf}
    return {**tree, head: join_table(tree.get(head, {}), leaf, tuple(rest))}


@struct.dataclass
class AdamW:
    """Clip by global norm, then AdamW (the recipe's settings are the defaults).

    The settings are pytree leaves, not static fields: passed into a compiled train step (as
    float32 arrays, `as_inputs()`), they are inputs of the program, so a run with other settings
    reuses the compiled program. The learning rate of each step is an input of `apply` for the
    same reason: the schedule is computed on the host.

    `apply(grads, state, params, learning_rate)` takes grads shaped as params except at
    TABLE_PATH, which holds a RowSparse, and returns (params, state, global gradient norm before
    clipping).
    """

    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    weight_decay: Any = 0.0
    max_grad_norm: Any = 1.0
    # 1 - b1 and 1 - b2 as optax computes them, in Python (float64) before rounding to float32;
    # None: from b1 and b2 here. A float32 input b2 = 0.999 would give 1 - b2 = 0.00099998713,
    # 1.3e-5 away from optax's 0.001.
    one_minus_b1: Any = None
    one_minus_b2: Any = None

    def as_inputs(self) -> "AdamW":
        """The settings as float32 arrays, for a compiled step's arguments."""
        settings = dataclasses.replace(self, one_minus_b1=1 - float(self.b1), one_minus_b2=1 - float(self.b2))
        return jax.tree.map(lambda x: np.asarray(x, np.float32), settings)

    def init(self, params: dict) -> OptState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return OptState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def apply(self, grads: dict, state: OptState, params: dict, learning_rate) -> tuple[dict, OptState, jax.Array]:
        rest_grads, table_grad = split_table(grads)
        if not isinstance(table_grad, RowSparse):
            raise TypeError(f"the gradient at {'/'.join(TABLE_PATH)} must be a RowSparse, got {type(table_grad)}")
        # The padding rows' values are zero, so the norm of the values is the dense gradient's.
        grad_norm = optax.tree.norm((rest_grads, table_grad.values))
        (rest_grads, table_values), _ = optax.clip_by_global_norm(self.max_grad_norm).update(
            (rest_grads, table_grad.values), optax.EmptyState())
        count = optax.safe_increment(state.count)
        (rest, table), (rest_mu, table_mu), (rest_nu, table_nu) = (split_table(t) for t in
                                                                   (params, state.mu, state.nu))
        new = jax.tree.map(functools.partial(self._update, count=count, learning_rate=learning_rate),
                           rest_grads, rest_mu, rest_nu, rest)
        rest, rest_mu, rest_nu = (jax.tree.map(lambda t, i=i: t[i], new, is_leaf=lambda t: isinstance(t, tuple))
                                  for i in range(3))
        table_rows = RowSparse(table_grad.rows, table_values)
        table, table_mu, table_nu = self._update(table_rows, table_mu, table_nu, table, count=count,
                                                 learning_rate=learning_rate)
        state = OptState(count, join_table(rest_mu, table_mu), join_table(rest_nu, table_nu))
        return join_table(rest, table), state, grad_norm

    def _update(self, g, mu, nu, param, *, count, learning_rate):
        """optax.adamw's update of one parameter: (param, mu, nu). Each line is the optax expression it
        mirrors (optax/tree_utils/_tree_math.py update_moment(_per_elem_norm) and bias_correction,
        transform.py scale_by_adam, transforms/_adding.py add_decayed_weights, scale,
        update.py apply_updates), so that both round alike. For a RowSparse g (the table) the
        moments' (1 - b) * g**k terms are added only at its rows: for a row without gradient the
        moment is exactly b * t, as optax's zero-gradient update gives, and the scatter-add into
        the freshly scaled moment runs in place."""
        b1, b2 = self.b1, self.b2
        one_minus_b1 = 1 - b1 if self.one_minus_b1 is None else self.one_minus_b1
        one_minus_b2 = 1 - b2 if self.one_minus_b2 is None else self.one_minus_b2
        if isinstance(g, RowSparse):
            mu = (b1 * mu).at[g.rows].add(one_minus_b1 * g.values, mode="drop")
            nu = (b2 * nu).at[g.rows].add(one_minus_b2 * g.values ** 2, mode="drop")
        else:
            mu = one_minus_b1 * g + b1 * mu
            nu = one_minus_b2 * g ** 2 + b2 * nu
        mu_hat = mu / (1 - b1 ** count).astype(mu.dtype)
        nu_hat = nu / (1 - b2 ** count).astype(nu.dtype)
        update = mu_hat / (jnp.sqrt(nu_hat + 0.0) + self.eps)  # optax's eps_root is 0
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay == 0.0):  # as optax: a constant 0 is skipped
            update = update + self.weight_decay * param
        update = (-1 * learning_rate) * update
        return jnp.asarray(param + update).astype(param.dtype), mu, nu
