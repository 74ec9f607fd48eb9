"""The train step, a pure function (state, batch, rng, optimizer settings) -> (state, metrics), and the
at most two programs a run compiles from it.

What varies between runs of the same model, loss and batch size (the learning rate of each step,
hence the schedule and the number of steps; the seed; AdamW's settings) enters the programs as
arguments, never as constants, so a second run takes its programs from the persistent compilation
cache. What decides the program (the model config, the loss, the packed shapes, the devices, the
dtype, dropout on or off, steps per dispatch) is a `StepSpec`.

The two programs (data.StepShapes):
- 'fast': the step's sentences packed in one batch of the fast shape, differentiated directly;
- 'general': any step, as micro-batches of rows as long as the longest sentence (256). A step
  that fits one micro-batch is differentiated directly; one that needs several has their
  embeddings computed first without gradient, the loss's gradient with respect to the embeddings
  taken, then each micro-batch run again and differentiated against its part of that gradient
  (GradCache, Gao et al. 2021): the same loss and gradient, for about one more forward pass. A run
  none of whose steps needs several micro-batches compiles the program without that loop
  (StepSpec.gradcache).
With several steps per dispatch, the general program runs each step in the shape it fits, and
also takes the run's last, shorter dispatch (padded with steps that change nothing).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from minilm_jax.config import BertConfig, Head
from minilm_jax.data import StepShapes
from minilm_jax.embedding import compute_dtype, packed_sentence_embeddings
from minilm_jax.optimizer import AdamW, RowSparse, join_table, split_table

AXIS = "devices"  # the pmap axis name, also given to replicate() so the step compiles once
PROGRAMS = ("fast", "general")
_LAYOUT_KEYS = ("ids", "positions", "segments", "slots")
_LOSS_RNG = 2**32 - 1  # folded into a step's key for the loss's draws; device indices fold in 0, 1, ...


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params, tx: AdamW) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_host_state(params, tx: AdamW) -> TrainState:
    """init_state's value in numpy, made without running anything on a device: a new run's state
    for to_devices, which copies it there once (init_state's zeros are small device programs,
    compiled and run at a run's start beside the train programs' compilation)."""
    shapes = jax.eval_shape(lambda: init_state(params, tx))
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    return zeros.replace(params=jax.tree.map(np.asarray, params))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything a compiled train step depends on besides its arguments."""

    config: BertConfig
    loss: Any  # a losses.* loss: local_loss(columns_CxBxD, labels_B, weights_B, count, axis_name)
    shapes: StepShapes
    dtype_name: str = "float32"
    dropout: bool = True
    # Whether the general program holds GradCache's loop over several micro-batches. A run none of
    # whose steps needs it (every Quora and STS-B step at batch 16) leaves it out: the general
    # program then lowers and compiles in about half the time (bench/RESULTS.md), with the same
    # result.
    gradcache: bool = True
    # The modules after the encoder (Pooling modes, Dense, Normalize): all-MiniLM-L6-v2's by default.
    head: Head = Head()
    # A prompt left out of pooling (Pooling's include_prompt False): per column, its leading tokens
    # ([CLS] and the prompt) that pooling skips; () when every token is pooled.
    prompt_lengths: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- loss and gradient

def _objective(emb_SxD, batch: dict, spec: StepSpec, axis_name: str | None, loss_rng):
    """This device's share of the global batch's loss (the shares sum to it over devices)."""
    shapes = spec.shapes
    columns_CxBxD = emb_SxD.reshape(shapes.columns, shapes.pairs, emb_SxD.shape[-1])
    # The loss's denominator: the real rows of the global batch, from every device's weights (each host
    # knows only its own rows).
    count = jnp.sum(batch["weights"])
    count = jnp.maximum(jax.lax.psum(count, axis_name) if axis_name else count, 1.0)
    return spec.loss.local_loss(columns_CxBxD, batch["labels"], batch["weights"], count, axis_name, rng=loss_rng)


def _local_model(params, ids: jax.Array, config: BertConfig, axis_name: str | None):
    """(parameters whose word-embedding table holds only the rows `ids` use, on every device; the
    ids renumbered into it; those rows; the config of that table)."""
    rest, table = split_table(params)
    # The table's own row count, not the config's (a caller may train part of the table).
    vocab_size = table.shape[0]
    rows_N, local_ids = batch_rows(ids, vocab_size, axis_name)
    local_table = table[jnp.minimum(rows_N, vocab_size - 1)]  # padding rows: any row, never read
    return join_table(rest, local_table), local_ids, rows_N, dataclasses.replace(config, vocab_size=rows_N.shape[0])


def _embed(params, layout: dict, spec: StepSpec, config: BertConfig, dropout_rng):
    return packed_sentence_embeddings(params, layout, spec.shapes.sentences, config=config, head=spec.head,
                                      dtype=compute_dtype(spec.dtype_name), dropout_rng=dropout_rng,
                                      prompt_lengths=spec.prompt_lengths)


def _sparse_table_grads(loss, grads, rows_N, axis_name):
    """Sum over devices; the table's gradient as a RowSparse (every device holds the same rows)."""
    if axis_name:
        loss, grads = jax.lax.psum((loss, grads), axis_name)
    rest_grads, table_grad = split_table(grads)
    return loss, join_table(rest_grads, RowSparse(rows_N, table_grad))


def fast_loss_and_grads(params, batch: dict, dropout_rng, *, spec: StepSpec, axis_name: str | None = AXIS,
                        loss_rng=None):
    """The global batch's loss and gradient, from the sentences packed in the fast shape
    (batch['fast']). The word-embedding table's gradient is row-sparse (optimizer.RowSparse): the
    encoder runs on a table of only the rows the batch uses. Dropout is on iff a dropout rng is given;
    loss_rng: the loss's own draws (MatryoshkaLoss's dimensions), the same on every device."""
    layout = batch["fast"]
    local_params, local_ids, rows_N, local_config = _local_model(params, layout["ids"], spec.config, axis_name)

    def loss_fn(p):
        emb_SxD = _embed(p, {**layout, "ids": local_ids}, spec, local_config, dropout_rng)
        return _objective(emb_SxD, batch, spec, axis_name, loss_rng)

    loss, grads = jax.value_and_grad(loss_fn)(local_params)
    return _sparse_table_grads(loss, grads, rows_N, axis_name)


def general_loss_and_grads(params, batch: dict, dropout_rng, *, spec: StepSpec, axis_name: str | None = AXIS,
                           loss_rng=None):
    """The same loss and gradient as fast_loss_and_grads, for any step: batch['general'] holds up
    to shapes.micro_batches micro-batches (the first `micro_batches` of them used), embedded one
    after the other, with the embeddings' gradient cached in between (GradCache). When no device
    has more than one, that one is differentiated directly."""
    layout = batch["general"]
    local_params, local_ids, rows_N, local_config = _local_model(params, layout["ids"], spec.config, axis_name)
    n_used = layout["micro_batches"]

    def embed_micro(p, m):
        micro = {k: jax.lax.dynamic_index_in_dim(layout[k], m, keepdims=False) for k in _LAYOUT_KEYS}
        micro["ids"] = jax.lax.dynamic_index_in_dim(local_ids, m, keepdims=False)
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, m)
        # A sentence lies in one micro-batch; the others' slots come out as zero rows.
        return _embed(p, micro, spec, local_config, rng)

    def one_micro_batch():  # no cache needed: differentiate it directly, one forward pass fewer
        return jax.value_and_grad(lambda p: _objective(embed_micro(p, 0), batch, spec, axis_name, loss_rng))(
            local_params)

    def cached():
        emb_SxD = jax.lax.fori_loop(0, n_used, lambda m, acc: acc + embed_micro(local_params, m),
                                    jnp.zeros((spec.shapes.sentences, spec.head.dimension(spec.config.hidden_size)),
                                              jnp.float32))
        loss, emb_grad_SxD = jax.value_and_grad(_objective)(emb_SxD, batch, spec, axis_name, loss_rng)

        def add_micro_grads(m, acc):
            _, pullback = jax.vjp(lambda p: embed_micro(p, m), local_params)
            return jax.tree.map(jnp.add, acc, pullback(emb_grad_SxD)[0])

        return loss, jax.lax.fori_loop(0, n_used, add_micro_grads, jax.tree.map(jnp.zeros_like, local_params))

    def never_taken():
        # Without the loop the conditional stays, with this branch in the loop's place: XLA then
        # compiles the direct branch as in the program with the loop, to the same rounding (a
        # program of the direct branch alone rounded some steps' gradients differently). The host
        # never sends such a step (train_lib.TrainPrograms.check); if one came, its NaN loss
        # would stop the run as non-finite.
        return jnp.float32(jnp.nan), jax.tree.map(jnp.zeros_like, local_params)

    # Every device must take the same branch (the loss may gather across devices).
    most = jax.lax.pmax(n_used, axis_name) if axis_name else n_used
    loss, grads = jax.lax.cond(most <= 1, one_micro_batch, cached if spec.gradcache else never_taken)
    return _sparse_table_grads(loss, grads, rows_N, axis_name)


def batch_rows(ids: jax.Array, vocab_size: int, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """The table rows a step's ids use, over all devices: (rows [N], ids renumbered into rows).

    rows are sorted and distinct, padded with vocab_size to a fixed N (the number of ids on all
    devices, at most the vocabulary), so that shapes are static and every device holds the same
    rows in the same order.
    """
    all_ids = jax.lax.all_gather(ids, axis_name) if axis_name else ids
    size = min(all_ids.size, vocab_size)
    rows_N = jnp.unique(all_ids.reshape(-1), size=size, fill_value=vocab_size)
    return rows_N, jnp.searchsorted(rows_N, ids).astype(ids.dtype)


# ----------------------------------------------------------------------------- the step

def train_step(state: TrainState, batch: dict, rng: jax.Array, tx: AdamW, *, spec: StepSpec, program: str,
               axis_name: str | None = AXIS):
    """One optimizer step on one device's share of the batch: (state, batch, rng, tx) -> (state, metrics).

    batch: one step of a data.Dispatch of `program` (the packed layout(s), labels/weights [pairs],
    learning_rate [], and with several steps per dispatch `kind`). Gradients are summed
    over devices; a step whose loss or gradient is not finite is reported in the metrics
    (`finite`) for the host to stop on.
    """
    if "kind" in batch:  # several steps per dispatch: each in the shape it fits, or skipped
        # Without a fast shape (the Cached* losses) every step is general.
        paths = ("fast" if "fast" in batch else "general", "general")
        branches = [_skip_step] + [functools.partial(_optimizer_step, spec=spec, path=path, axis_name=axis_name)
                                   for path in paths]
        return jax.lax.switch(batch["kind"], branches, state, batch, rng, tx)
    return _optimizer_step(state, batch, rng, tx, spec=spec, path=program, axis_name=axis_name)


def _optimizer_step(state: TrainState, batch: dict, rng: jax.Array, tx: AdamW, *, spec: StepSpec, path: str,
                    axis_name: str | None):
    # Independent dropout per device; a single device (no axis) draws as device 0 of a pmap would.
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    step_rng = jax.random.fold_in(rng, state.step)
    dropout_rng = jax.random.fold_in(step_rng, device) if spec.dropout else None
    # The loss's own draws are the same on every device: a value no device index takes.
    loss_rng = jax.random.fold_in(step_rng, _LOSS_RNG)
    loss_and_grads = fast_loss_and_grads if path == "fast" else general_loss_and_grads
    loss, grads = loss_and_grads(state.params, batch, dropout_rng, spec=spec, axis_name=axis_name,
                                 loss_rng=loss_rng)
    learning_rate = batch["learning_rate"]
    params, opt_state, grad_norm = tx.apply(grads, state.opt_state, state.params, learning_rate)
    # No in-graph guard against a non-finite step (selecting old or new state costs a third of the
    # optimizer's time on CPU): the host checks every step's metrics before it saves a checkpoint,
    # so a non-finite step stops the run with the last good checkpoint on disk.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics


def _skip_step(state: TrainState, batch: dict, rng: jax.Array, tx: AdamW):
    """A padding step: the state unchanged."""
    zero = jnp.zeros((), jnp.float32)
    return state, {"loss": zero, "learning_rate": batch["learning_rate"], "grad_norm": zero,
                   "finite": jnp.ones((), bool)}


def train_steps(state: TrainState, batches: dict, rng: jax.Array, tx: AdamW, **step_kwargs):
    """Several train steps in one device call: `batches` has a leading step axis."""

    def body(carry, batch):
        return train_step(carry, batch, rng, tx, **step_kwargs)

    return jax.lax.scan(body, state, batches)


def step_program(spec: StepSpec, program: str, n_devices: int):
    """`train_steps` for `n_devices` devices in all: (state, batches [local devices, steps, ...], rng,
    tx) -> (state, metrics [local devices, steps]), the state donated and placed by `to_devices`.

    Several devices: jax.pmap over AXIS, gradients summed with psum. One device: plain jax.jit of
    the same function, which is the same maths without pmap's copies (16-19% of a CPU step at
    batch 16, bench/RESULTS.md). The device axis of batches and metrics is kept either way, so the
    loop around it does not care which it got.
    """
    if program not in PROGRAMS:
        raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
    if n_devices > 1:
        def devices(state, batches, rng, tx):
            return train_steps(state, batches, rng, tx, spec=spec, program=program)

        devices.__name__ = devices.__qualname__ = f"train_program_{program}"  # names its compilation cache entry
        return jax.pmap(devices, axis_name=AXIS, in_axes=(0, 0, None, None), donate_argnums=(0,))

    def one_device(state, batches, rng, tx):
        state, metrics = train_steps(state, jax.tree.map(lambda x: x[0], batches), rng, tx, spec=spec,
                                     program=program, axis_name=None)
        return state, jax.tree.map(lambda x: x[None], metrics)

    one_device.__name__ = one_device.__qualname__ = f"train_program_{program}"
    return jax.jit(one_device, donate_argnums=(0,))


def to_devices(tree, n_devices: int):
    """Place `tree` for step_program: replicated over the local devices for pmap, or a private
    copy on the one device (the step donates it, and `tree` may be a loaded model's)."""
    if n_devices > 1:
        from flax import jax_utils

        return jax_utils.replicate(tree, axis_name=AXIS)
    return jax.tree.map(jnp.array, tree)


def from_devices(tree, n_devices: int):
    """Host (numpy) copy of a tree placed by `to_devices`: device 0's replica when replicated."""
    if n_devices > 1:
        from flax import jax_utils

        tree = jax_utils.unreplicate(tree)
    return jax.device_get(tree)
