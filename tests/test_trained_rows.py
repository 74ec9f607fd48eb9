"""The train state holds only the word-embedding rows the run's data uses (trained_rows.py).

- The rows are every id of the data and the padding id, rounded up to ROW_MULTIPLE; with weight
  decay every row is trained.
- Renumbered ids point at the same rows; the state round-trips to the full table.
- Steps on the trained rows with renumbered ids give the full table's steps exactly: the same
  parameters and moments, bit for bit, on real Quora batches (the untrained rows unchanged).
- A checkpoint whose other rows were trained (the data changed) is refused, not resumed wrongly.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from minilm_jax import data as data_lib, train_lib, train_step
from minilm_jax.errors import UserError
from minilm_jax.optimizer import split_table
from minilm_jax.pairs import load_pairs
from minilm_jax.trained_rows import ROW_MULTIPLE, TrainedRows
from tiny_model import write_tiny_model


@pytest.fixture(scope="module")
def tiny(model_path, tmp_path_factory):
    from minilm_jax.encode import load

    return load(write_tiny_model(model_path, str(tmp_path_factory.mktemp("tiny") / "m")))


@pytest.fixture(scope="module")
def tokens(tiny, data_dir):
    pairs = load_pairs(str(data_dir / "quora_train.tsv"), unit_interval=True)
    return data_lib.tokenize_pairs(pairs.select(np.arange(480)), tiny.tokenizer)


def test_the_rows_are_the_data_s_ids_rounded_up(tokens, tiny):
    vocab = tiny.config.vocab_size
    rows = TrainedRows.for_data(tokens, vocab, weight_decay=0.0)
    used = np.unique(np.concatenate([np.concatenate(c) for c in tokens.columns] + [[0]]))
    assert rows.size % ROW_MULTIPLE == 0 and rows.size - len(used) < ROW_MULTIPLE and rows.size < vocab // 2
    assert np.array_equal(np.unique(rows.rows), rows.rows) and np.isin(used, rows.rows).all()
    renumbered = rows.renumber(tokens)
    for old, new in zip(tokens.columns, renumbered.columns):
        for a, b in zip(old[:50], new[:50]):
            assert np.array_equal(rows.rows[b], a) and b.max() < rows.size
    assert TrainedRows.for_data(tokens, vocab, weight_decay=0.01).all_rows


def test_steps_on_the_trained_rows_equal_steps_on_the_full_table(tiny, tokens):
    cfg = train_lib.TrainConfig(batch_size=16, max_steps=6)
    spec = train_lib.step_spec(cfg, tiny, 1)
    tx = train_lib.make_optimizer(cfg)
    rows = TrainedRows.for_data(tokens, tiny.config.vocab_size, cfg.weight_decay)
    rates = train_lib.learning_rates(cfg, 6)
    programs = {name: train_step.step_program(spec, name, 1) for name in spec.shapes.programs}
    rng, inputs = jax.random.PRNGKey(0), tx.as_inputs()

    def run(state, data):
        state = train_step.to_devices(state, 1)
        layout = data_lib.BatchLayout(16)
        for d in data_lib.dispatch_groups(data, layout, spec.shapes, 42, 0, 6, 3):
            state, _ = programs[d.program](state, train_lib.with_learning_rates(d, rates, 3), rng, inputs)
        return train_step.from_devices(state, 1)

    full = run(train_step.init_state(tiny.params, tx), tokens)
    trained = run(train_step.init_state(rows.train_params(tiny.params), tx), rows.renumber(tokens))
    back = rows.full_state(trained, tiny.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    table = np.asarray(split_table(back.params)[1])
    untouched = np.setdiff1d(np.arange(tiny.config.vocab_size), rows.rows)
    assert np.array_equal(table[untouched], np.asarray(split_table(tiny.params)[1])[untouched])
    assert not np.array_equal(table[rows.rows], np.asarray(split_table(tiny.params)[1])[rows.rows])
    # And back again, as a resumed run restores its checkpoint.
    again = rows.train_state(back)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_that_trained_other_rows_is_refused(tiny, tokens):
    tx = train_lib.make_optimizer(train_lib.TrainConfig())
    rows = TrainedRows.for_data(tokens, tiny.config.vocab_size, 0.0)
    state = jax.device_get(train_step.init_state(tiny.params, tx))
    other = int(np.setdiff1d(np.arange(tiny.config.vocab_size), rows.rows)[0])
    _, nu = split_table(state.opt_state.nu)
    nu = np.array(nu)
    nu[other] = 1e-12
    from minilm_jax.optimizer import join_table

    bad = state.replace(opt_state=state.opt_state.replace(nu=join_table(split_table(state.opt_state.nu)[0], nu)))
    with pytest.raises(UserError, match="the data changed since the checkpoint"):
        rows.train_state(bad)
