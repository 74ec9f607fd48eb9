"""The word-embedding rows a run trains: only those its training data uses.

With weight decay 0, a row of the table that no batch of the run uses gets a zero gradient at
every step, so AdamW leaves it exactly as it was: its moments stay 0 and its update is
0 / (sqrt(0) + eps) = 0. A run's train state therefore holds only the rows its data uses,
renumbered 0..R-1, and its data's token ids are renumbered alike. The maths is unchanged, and
AdamW's dense passes over the table (its moments and its parameters, the largest memory traffic
of a CPU step) shrink from 30,522 rows to R: about 10,000 for 5,000 Quora pairs, 17,600 for all
of them.

Checkpoints, evaluations and the export see the full table: `full_state` puts the trained rows
back into it. With weight decay, every row decays at every step, so every row is trained.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minilm_jax.data import TokenizedPairs
from minilm_jax.errors import UserError
from minilm_jax.optimizer import OptState, join_table, split_table

# R is rounded up to a multiple of this (with rows no batch uses, which stay as they are), so that
# runs on similar data share their compiled programs.
ROW_MULTIPLE = 2048
PADDING_ID = 0  # the id packed batches put in their padding slots (data._pack_rows)


@dataclasses.dataclass(frozen=True)
class TrainedRows:
    """rows [R]: the trained rows' ids in the full table, sorted; new ids are positions in it."""

    rows: np.ndarray
    vocab_size: int

    @classmethod
    def for_data(cls, tokens: TokenizedPairs, vocab_size: int, weight_decay: float) -> "TrainedRows":
        """The rows `tokens` use (all rows when weight decay is not 0), rounded up to ROW_MULTIPLE."""
        if weight_decay != 0.0:
            return cls(np.arange(vocab_size, dtype=np.int32), vocab_size)
        used = np.zeros(vocab_size, bool)
        used[PADDING_ID] = True
        for column in tokens.columns:
            if column:
                used[np.concatenate(column)] = True
        size = min(vocab_size, -(-int(used.sum()) // ROW_MULTIPLE) * ROW_MULTIPLE)
        unused = np.flatnonzero(~used)
        rows = np.sort(np.concatenate([np.flatnonzero(used), unused[:size - int(used.sum())]]))
        return cls(rows.astype(np.int32), vocab_size)

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def all_rows(self) -> bool:
        return self.size == self.vocab_size

    def renumber(self, tokens: TokenizedPairs) -> TokenizedPairs:
        """`tokens` with every id replaced by its row's position among the trained rows."""
        if self.all_rows:
            return tokens
        new_id = np.full(self.vocab_size, -1, np.int32)
        new_id[self.rows] = np.arange(self.size, dtype=np.int32)
        columns = []
        for column in tokens.columns:
            flat = new_id[np.concatenate(column)] if column else np.zeros(0, np.int32)
            if (flat < 0).any():
                raise ValueError("the tokens use a row that is not trained: TrainedRows.for_data was given other data")
            columns.append(np.split(flat, np.cumsum([len(ids) for ids in column])[:-1]) if column else [])
        return dataclasses.replace(tokens, columns=tuple(columns))

    def train_params(self, params):
        """Parameters of the full table -> the same holding only the trained rows."""
        return params if self.all_rows else self._take(params)

    def train_state(self, state):
        """A TrainState (host arrays) of the full table -> the same state holding only the trained
        rows. Every other row must have zero moments (a checkpoint of this run's data has)."""
        if self.all_rows:
            return state
        others = np.ones(self.vocab_size, bool)
        others[self.rows] = False
        for name in ("mu", "nu"):
            if np.any(np.asarray(split_table(getattr(state.opt_state, name))[1])[others]):
                raise UserError("the checkpoint has trained word-embedding rows that this run's training data does "
                                "not use: the data changed since the checkpoint was written; resume with the same "
                                "data, or start again in a new --output-dir")
        opt = state.opt_state
        return state.replace(params=self._take(state.params), opt_state=OptState(
            opt.count, self._take(opt.mu), self._take(opt.nu)))

    def full_state(self, state, full_params):
        """The inverse of train_state: the trained rows put back into `full_params`' table (the
        other rows' values), with zero moments for the other rows."""
        if self.all_rows:
            return state
        table = np.asarray(split_table(full_params)[1])
        opt = state.opt_state
        return state.replace(params=self._put(state.params, table), opt_state=OptState(
            opt.count, self._put(opt.mu, np.zeros_like(table), copy=False),
            self._put(opt.nu, np.zeros_like(table), copy=False)))

    def full_params(self, params, full_params):
        """Trained parameters with the full table (the other rows from `full_params`)."""
        return params if self.all_rows else self._put(params, np.asarray(split_table(full_params)[1]))

    def _take(self, tree):
        rest, table = split_table(tree)
        return join_table(rest, np.asarray(table)[self.rows])

    def _put(self, tree, full_table: np.ndarray, copy: bool = True):
        """copy False: full_table is a fresh array of this call's own, written in place."""
        rest, trained = split_table(tree)
        table = np.array(full_table, copy=True) if copy else full_table
        table[self.rows] = np.asarray(trained)
        return join_table(rest, table)
