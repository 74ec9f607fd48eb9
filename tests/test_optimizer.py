"""The row-sparse word-embedding gradient and the optimizer that takes it (minilm_jax/optimizer.py).

- AdamW.apply with a RowSparse table gradient gives what optax.chain(clip_by_global_norm, adamw)
  gives with the same gradient made dense, step after step: rows touched in some steps and not
  others, padding entries, the clip on and off, weight decay 0 and not.
- Its settings are inputs of a compiled update: one program serves other settings, each giving
  what optax gives with them.
- train_step.fast_loss_and_grads, which runs the encoder on a table of the batch's rows only, gives
  the same loss and, once scattered, the same gradient as differentiating the whole model (real
  weights, a real packed Quora batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minilm_jax import data as data_lib, losses, train_step
from minilm_jax.config import BertConfig
from minilm_jax.model import init_params
from minilm_jax.optimizer import TABLE_PATH, AdamW, RowSparse, join_table, split_table

N_ROWS = 48  # table gradient entries per step, some of them padding


def dense(grad: RowSparse, n_rows: int) -> jax.Array:
    return jnp.zeros((n_rows, grad.values.shape[1]), grad.values.dtype).at[grad.rows].add(grad.values, mode="drop")


def random_grads(params, step: int, scale: float, vocab: int):
    """A gradient tree shaped as params, the table's part a RowSparse: distinct rows drawn from a
    small range (so rows recur across steps and others go untouched), then padding entries."""
    rng = np.random.default_rng(step)
    rest, _ = split_table(params)
    leaves, treedef = jax.tree.flatten(rest)
    rest_grads = treedef.unflatten([jnp.asarray(rng.standard_normal(x.shape) * scale, jnp.float32) for x in leaves])
    n_real = N_ROWS - 5
    rows = np.sort(rng.choice(100, n_real, replace=False)).astype(np.int32)
    rows = np.concatenate([rows, np.full(N_ROWS - n_real, vocab, np.int32)])
    values = rng.standard_normal((N_ROWS, params["embeddings"]["word_embeddings"]["embedding"].shape[1])) * scale
    values[n_real:] = 0.0
    return join_table(rest_grads, RowSparse(jnp.asarray(rows), jnp.asarray(values, jnp.float32)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("scale", [1e-3, 1.0], ids=["clip-off", "clip-on"])
def test_row_sparse_adamw_is_optax_adamw_on_the_dense_gradient(weight_decay, scale):
    config = BertConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    schedule = optax.linear_schedule(5e-5, 0.0, 20)
    ours = AdamW(weight_decay=weight_decay, max_grad_norm=1.0)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    ours_params, ours_state = params, ours.init(params)
    ref_params, ref_state = params, reference.init(params)
    # The settings and the learning rate as inputs of the compiled update, as in the train step.
    apply = jax.jit(lambda tx, *args: tx.apply(*args))
    clipped = []
    for step in range(6):
        grads = random_grads(params, step, scale, config.vocab_size)
        rest_grads, table_grad = split_table(grads)
        dense_grads = join_table(rest_grads, dense(table_grad, config.vocab_size))

        ours_params, ours_state, grad_norm = apply(ours.as_inputs(), grads, ours_state, ours_params,
                                                   schedule(jnp.int32(step)))
        updates, ref_state = reference.update(dense_grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)

        ref_norm = float(optax.tree.norm(dense_grads))
        clipped.append(ref_norm > 1.0)
        np.testing.assert_allclose(float(grad_norm), ref_norm, rtol=1e-6)
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ours_params), jax.tree.leaves(ours_params),
                              jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9,
                                       err_msg=f"step {step}, {jax.tree_util.keystr(path[0])}")
    assert all(clipped) if scale == 1.0 else not any(clipped)
    # The table moved where it had gradients, and rows touched only in earlier steps kept moving.
    table_before = params["embeddings"]["word_embeddings"]["embedding"]
    table_after = ours_params["embeddings"]["word_embeddings"]["embedding"]
    moved = np.any(np.asarray(table_after != table_before), axis=1)
    last_rows = set(np.asarray(split_table(random_grads(params, 5, scale, config.vocab_size))[1].rows).tolist())
    earlier_only = [r for r in range(100) if moved[r] and r not in last_rows]
    assert earlier_only, "no row that only earlier steps touched"
    assert not moved[100:].any() if weight_decay == 0.0 else moved[100:].all()


def test_settings_are_inputs_of_one_compiled_update():
    """Other betas, eps, weight decay, clip and learning rate: the same program, optax's results."""
    config = BertConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    apply = jax.jit(lambda tx, *args: tx.apply(*args))
    for settings, lr in [({}, 5e-5), ({"b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.01,
                                      "max_grad_norm": 0.5}, 1e-3)]:
        ours = AdamW(**settings)
        reference = optax.chain(optax.clip_by_global_norm(ours.max_grad_norm),
                                optax.adamw(lr, b1=ours.b1, b2=ours.b2, eps=ours.eps, weight_decay=ours.weight_decay))
        grads = random_grads(params, 0, 1.0, config.vocab_size)
        rest_grads, table_grad = split_table(grads)
        new_params, _, _ = apply(ours.as_inputs(), grads, ours.init(params), params, np.float32(lr))
        updates, _ = reference.update(join_table(rest_grads, dense(table_grad, config.vocab_size)),
                                      reference.init(params), params)
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(optax.apply_updates(params, updates))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    assert apply._cache_size() == 1


def test_a_dense_table_gradient_is_refused():
    config = BertConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    optimizer = AdamW()
    with pytest.raises(TypeError, match="RowSparse"):
        optimizer.apply(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params, 1e-3)


def test_split_and_join_give_back_the_tree():
    params = init_params(BertConfig.tiny(), jax.random.PRNGKey(0))
    rest, table = split_table(params)
    assert "word_embeddings" not in rest["embeddings"] and table.shape == (30522, 64)
    assert jax.tree.structure(join_table(rest, table)) == jax.tree.structure(params)
    with pytest.raises(KeyError, match="/".join(TABLE_PATH)):
        split_table(rest)


def test_batch_rows_renumber_ids_into_sorted_distinct_rows():
    ids = jnp.asarray([[5, 9, 5, 0], [9, 30521, 0, 0]], jnp.int32)
    rows, local = train_step.batch_rows(ids, 30522, None)
    assert rows.shape == (8,)
    np.testing.assert_array_equal(rows, [0, 5, 9, 30521, 30522, 30522, 30522, 30522])
    np.testing.assert_array_equal(rows[local], ids)


def test_loss_and_row_sparse_gradient_equal_the_whole_model_s(jax_model, data_dir):
    from minilm_jax.embedding import packed_sentence_embeddings
    from minilm_jax.losses import cosine_mse_terms
    from minilm_jax.pairs import load_pairs

    pairs = load_pairs(str(data_dir / "quora_train.tsv"), unit_interval=True)
    tokens = data_lib.tokenize_pairs(pairs, jax_model.tokenizer)
    shapes = data_lib.step_shapes(16, 2, 256)
    dispatch = next(d for d in data_lib.dispatch_groups(tokens, data_lib.BatchLayout(16), shapes, 42, 0, 20, 1)
                    if d.program == "fast")
    batch = jax.tree.map(lambda x: jnp.asarray(x[0, 0]), dispatch.arrays)
    config, params = jax_model.config, jax.tree.map(jnp.asarray, jax_model.params)
    rng = jax.random.PRNGKey(3)  # dropout on: the same masks either way

    def whole_model_loss(p):
        emb = packed_sentence_embeddings(p, batch["fast"], 32, config=config, dropout_rng=rng)
        return jnp.sum(cosine_mse_terms(emb[:16], emb[16:], batch["labels"], batch["weights"])) / jnp.sum(batch["weights"])

    loss, grads = jax.jit(jax.value_and_grad(whole_model_loss))(params)
    spec = train_step.StepSpec(config, losses.CosineSimilarityLoss(), shapes)
    sparse_loss, sparse_grads = jax.jit(
        lambda p: train_step.fast_loss_and_grads(p, batch, rng, spec=spec, axis_name=None))(params)

    np.testing.assert_allclose(float(sparse_loss), float(loss), rtol=1e-6)
    rest, table = split_table(grads)
    sparse_rest, table_grad = split_table(sparse_grads)
    for a, b in zip(jax.tree.leaves(sparse_rest), jax.tree.leaves(rest)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    rows = np.asarray(table_grad.rows)
    real = rows[rows < config.vocab_size]
    assert set(real.tolist()) == set(np.asarray(batch["fast"]["ids"]).ravel().tolist())
    assert np.all(np.diff(real) > 0) and np.all(rows[len(real):] == config.vocab_size)
    assert not np.asarray(table_grad.values)[len(real):].any()
    np.testing.assert_allclose(np.asarray(dense(table_grad, config.vocab_size)), np.asarray(table),
                               rtol=1e-5, atol=1e-9)
