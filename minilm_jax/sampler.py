"""Batches with no text twice: sentence-transformers' NoDuplicatesBatchSampler (BatchSamplers.NO_DUPLICATES)
as a pure function of (the rows' texts, batch size, seed, epoch).

With in-batch negatives (MultipleNegativesRankingLoss and kin) a text that occurs twice in a batch
is a false negative: a row's positive is also another row's candidate negative. The algorithm is
sentence-transformers 6.2's `NoDuplicatesBatchSampler._iter_one_pass` and `__iter__`:

- shuffle the rows (here numpy's `default_rng([seed, epoch])`, as data.epoch_permutation; torch's
  generator in sentence-transformers, so the order differs, the rules do not);
- fill a batch by walking the rows not yet taken, in shuffled order, taking each row none of
  whose texts (any column) is already in the batch; a conflicting row is deferred, not dropped:
  it stays in place and the next batch's walk meets it first;
- a walk that reaches the end without filling the batch gives a short batch, kept unless
  drop_last (its rows are then dropped for this pass); walks go on until every row is taken, so
  with many repeated texts the end of an epoch can hold several short batches;
- the number of batches sentence-transformers advertises is `expected_batches` (n // b with
  drop_last, else ceil(n / b)). With drop_last, when one pass gives fewer full batches than that,
  it reshuffles (up to 2 more passes, here `default_rng([seed, epoch, pass])`) and keeps taking
  full batches until the count is reached: those rows appear twice in the epoch. Without
  drop_last the first pass is never cut, and may give more batches than advertised.

Texts are compared exactly (sentence-transformers compares str(value) of every non-label column).
Without drop_last every row appears exactly once per epoch. When no text repeats at all, the
batches are the consecutive slices of the shuffled order: data.batch_indices' batches.

Time: 296,496 rows of two columns (nine copies of quora_train.tsv, whose questions recur up to
12 times) take 2.3 s per epoch, text_ids included (tests/test_sampler.py, on a loaded 2-core
machine). The walk costs about (rows x rows it defers), as sentence-transformers' does: a text
that recurs in tens of thousands of rows (each batch can hold it once) makes the end of an epoch
quadratic in that count; with a few hundred repeats it does not show.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from minilm_jax.errors import UserError

MAX_RESAMPLE_PASSES = 2  # sentence-transformers' _MAX_RESAMPLE_PASSES


def text_ids(columns: Sequence[Sequence[str]]) -> np.ndarray:
    """[N, C] int64: equal texts get equal ids, across all columns (compute once per data set)."""
    if not columns:
        raise UserError("no text columns to sample batches from")
    n = len(columns[0])
    if any(len(column) != n for column in columns):
        raise UserError(f"text columns of different lengths: {[len(c) for c in columns]}")
    ids: dict[str, int] = {}
    out = np.empty((n, len(columns)), np.int64)
    for c, column in enumerate(columns):
        out[:, c] = [ids.setdefault(text, len(ids)) for text in column]
    return out


def expected_batches(n_rows: int, batch_size: int, drop_last: bool = False) -> int:
    """The number of batches sentence-transformers advertises for an epoch (its __len__)."""
    return n_rows // batch_size if drop_last else -(-n_rows // batch_size)


def _one_pass(rows: list, order: np.ndarray, batch_size: int, drop_last: bool):
    """Yield (batch, full) over one shuffled order, sentence-transformers' walk over a linked list."""
    n = len(order)
    order = order.tolist()
    next_position = list(range(1, n + 1))
    next_position[-1] = -1
    head = 0
    while head != -1:
        batch_values: set = set()
        batch: list = []
        current, previous, full = head, -1, False
        while current != -1:
            following = next_position[current]
            index = order[current]
            values = rows[index]
            if not batch_values.isdisjoint(values):
                previous, current = current, following  # deferred: stays in the list
                continue
            batch.append(index)
            if previous == -1:
                head = following
            else:
                next_position[previous] = following
            if len(batch) == batch_size:
                full = True
                break
            batch_values.update(values)
            current = following
        if full or not drop_last:
            yield np.asarray(batch, np.int64), full


def no_duplicates_batches(ids_NxC: np.ndarray, batch_size: int, seed: int, epoch: int,
                          drop_last: bool = False) -> list[np.ndarray]:
    """The epoch's batches (row indices) such that no batch holds a text twice (see the module
    docstring for the exact rules). `ids_NxC` from `text_ids`."""
    ids_NxC = np.asarray(ids_NxC)
    if ids_NxC.ndim != 2:
        raise UserError(f"expected text ids [rows, columns], got shape {ids_NxC.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(ids_NxC)
    if n == 0:
        return []
    rows = [frozenset(r) for r in ids_NxC.tolist()]
    expected = expected_batches(n, batch_size, drop_last)
    batches = [b for b, _ in _one_pass(rows, np.random.default_rng([seed, epoch]).permutation(n), batch_size,
                                       drop_last)]
    if len(batches) >= expected or not batches:
        return batches
    for extra in range(1, MAX_RESAMPLE_PASSES + 1):  # only with drop_last: a first pass is never cut
        for batch, _ in _one_pass(rows, np.random.default_rng([seed, epoch, extra]).permutation(n), batch_size,
                                  drop_last):
            batches.append(batch)
            if len(batches) >= expected:
                return batches
    return batches
