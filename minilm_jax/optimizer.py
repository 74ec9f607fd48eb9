"""The recipe's optimizer, gradient-norm clipping then AdamW, for a model whose word-embedding
table gets a row-sparse gradient.

Why row-sparse: a batch of 16 pairs touches a few hundred of the table's 30,522 rows, but a dense
gradient costs a zero-filled 47 MB table, a scatter into it and Adam passes that read it: the
step took 334 ms with it and takes 305 without it on 2 CPU cores (bench/RESULTS.md).
`train_lib.loss_and_grads` differentiates with respect to the batch's rows only and hands them
over as a `RowSparse`.

The maths is optax's, to the rounding of a sum: the clip is `optax.clip_by_global_norm` and every
other parameter goes through `optax.adamw` itself. The table goes through the same AdamW written
for rows: a row without gradient gets optax's zero-gradient update (mu*b1, nu*b2, and the
parameter step those give), a row with gradient the full one. tests/test_optimizer.py checks it
against `optax.chain(clip_by_global_norm, adamw)` with the dense gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
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
class TableAdamState:
    count: jax.Array  # updates applied, as optax's ScaleByAdamState.count
    mu: jax.Array
    nu: jax.Array


@struct.dataclass
class OptState:
    dense: Any  # optax.adamw's state over every parameter but the table
    table: TableAdamState


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


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Clip by global norm, then AdamW (the recipe's settings are TrainConfig's defaults).

    `apply(grads, state, params)` takes grads shaped as params except at TABLE_PATH, which holds a
    RowSparse, and returns (params, state, global gradient norm before clipping).
    """

    learning_rate: optax.Schedule
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def _dense(self) -> optax.GradientTransformation:
        return optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)

    def init(self, params: dict) -> OptState:
        rest, table = split_table(params)
        return OptState(dense=self._dense().init(rest),
                        table=TableAdamState(count=jnp.zeros([], jnp.int32), mu=jnp.zeros_like(table),
                                             nu=jnp.zeros_like(table)))

    def apply(self, grads: dict, state: OptState, params: dict) -> tuple[dict, OptState, jax.Array]:
        rest_grads, table_grad = split_table(grads)
        if not isinstance(table_grad, RowSparse):
            raise TypeError(f"the gradient at {'/'.join(TABLE_PATH)} must be a RowSparse, got {type(table_grad)}")
        # The padding rows' values are zero, so the norm of the values is the dense gradient's.
        grad_norm = optax.tree.norm((rest_grads, table_grad.values))
        (rest_grads, table_values), _ = optax.clip_by_global_norm(self.max_grad_norm).update(
            (rest_grads, table_grad.values), optax.EmptyState())
        rest, table = split_table(params)
        updates, dense_state = self._dense().update(rest_grads, state.dense, rest)
        table, table_state = self._table_update(table, RowSparse(table_grad.rows, table_values), state.table)
        return join_table(optax.apply_updates(rest, updates), table), OptState(dense_state, table_state), grad_norm

    def _table_update(self, table: jax.Array, grad: RowSparse, state: TableAdamState):
        """optax.adamw's update of one parameter, written for a row-sparse gradient. Each line is the
        optax expression it mirrors (optax/_src/transform.py scale_by_adam, add_decayed_weights,
        scale_by_learning_rate; optax/tree_utils bias correction), so that both round alike."""
        b1, b2 = self.b1, self.b2
        # (1 - b) * g**k + b * t: for a row without gradient that is exactly b * t.
        mu = (b1 * state.mu).at[grad.rows].add((1 - b1) * grad.values, mode="drop")
        nu = (b2 * state.nu).at[grad.rows].add((1 - b2) * grad.values ** 2, mode="drop")
        count = optax.safe_increment(state.count)
        mu_hat = mu / (1 - b1 ** count).astype(mu.dtype)
        nu_hat = nu / (1 - b2 ** count).astype(nu.dtype)
        update = mu_hat / (jnp.sqrt(nu_hat + 0.0) + self.eps)  # optax's eps_root is 0
        if self.weight_decay != 0.0:  # optax skips a constant zero decay too
            update = update + self.weight_decay * table
        update = jnp.array(-1 * self.learning_rate(state.count), dtype=update.dtype) * update
        return jnp.asarray(table + update).astype(table.dtype), TableAdamState(count=count, mu=mu, nu=nu)
