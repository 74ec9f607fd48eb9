"""minilm_jax.sampler: batches without a repeated text, as sentence-transformers' NoDuplicatesBatchSampler.

- Given the same shuffled order, the batches are exactly sentence-transformers 6.2's (its sampler
  run with torch.randperm replaced by our permutations), with and without drop_last, on rows whose
  texts repeat often (deferrals, several short batches at the end, resample passes).
- On real data (the Quora pairs, whose questions recur up to 12 times): no batch holds a text
  twice in any column, every row once per epoch, deterministic in (seed, epoch).
- 300,000 rows (Quora's pattern of repeats) in a few seconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from minilm_jax import sampler
from minilm_jax.errors import UserError


def repetitive_rows(n: int, n_texts: int, n_columns: int, seed: int) -> list[list[str]]:
    """Columns of texts drawn from a small vocabulary (Zipf-like), so that most batches defer rows."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_texts + 1)
    draws = rng.choice(n_texts, size=(n_columns, n), p=weights / weights.sum())
    return [[f"text {k}" for k in column] for column in draws]


def st_batches(columns: list[list[str]], batch_size: int, drop_last: bool, permutations: list[np.ndarray],
               monkeypatch) -> list[list[int]]:
    """sentence-transformers' NoDuplicatesBatchSampler over these rows, its shuffles replaced by ours."""
    import torch
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    dataset = Dataset.from_dict({**{f"column{c}": col for c, col in enumerate(columns)},
                                 "label": [1.0] * len(columns[0])})
    queue = list(permutations)

    def randperm(n, generator=None, dtype=torch.int64):
        order = queue.pop(0)
        assert len(order) == n
        return torch.tensor(order, dtype=dtype)

    monkeypatch.setattr(torch, "randperm", randperm)
    st = NoDuplicatesBatchSampler(dataset, batch_size=batch_size, drop_last=drop_last,
                                  valid_label_columns=["label"], seed=0)
    return [list(b) for b in st]


def our_permutations(n: int, seed: int, epoch: int) -> list[np.ndarray]:
    return [np.random.default_rng([seed, epoch]).permutation(n)] + \
           [np.random.default_rng([seed, epoch, k]).permutation(n) for k in range(1, sampler.MAX_RESAMPLE_PASSES + 1)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n_rows, n_texts, n_columns, batch_size",
                         [(300, 90, 2, 8), (240, 40, 3, 6), (500, 2000, 2, 16), (50, 12, 2, 8)])
def test_same_batches_as_sentence_transformers(monkeypatch, drop_last, n_rows, n_texts, n_columns, batch_size):
    columns = repetitive_rows(n_rows, n_texts, n_columns, seed=n_rows)
    ids = sampler.text_ids(columns)
    for epoch in range(2):
        ours = [b.tolist() for b in sampler.no_duplicates_batches(ids, batch_size, 5, epoch, drop_last)]
        theirs = st_batches(columns, batch_size, drop_last, our_permutations(n_rows, 5, epoch), monkeypatch)
        assert ours == theirs
    short = [b for b in ours if len(b) < batch_size]
    if drop_last:
        assert not short
    elif n_texts < n_rows:
        assert len(short) > 1, "rows this repetitive should leave several short batches at the end"


def test_resample_passes_when_drop_last_falls_short(monkeypatch):
    """A text in nearly every row: one pass gives too few full batches; as sentence-transformers,
    further shuffled passes top the epoch up to the advertised count (rows then repeat)."""
    n, batch_size = 64, 4
    rng = np.random.default_rng(0)
    columns = [["the same question"] * 40 + [f"q{i}" for i in range(24)], [f"a{i}" for i in rng.permutation(n)]]
    ids = sampler.text_ids(columns)
    ours = [b.tolist() for b in sampler.no_duplicates_batches(ids, batch_size, 1, 0, drop_last=True)]
    assert ours == st_batches(columns, batch_size, True, our_permutations(n, 1, 0), monkeypatch)
    assert len(ours) == sampler.expected_batches(n, batch_size, drop_last=True) == 16
    rows = np.concatenate(ours)
    assert len(set(rows.tolist())) < len(rows)  # repeats, from the extra passes


@pytest.fixture(scope="module")
def quora_columns(data_dir) -> list[list[str]]:
    from minilm_jax.pairs import load_pairs

    return load_pairs(str(data_dir / "quora_train.tsv")).columns()


def test_real_quora_rows(quora_columns):
    """quora_train.tsv: questions recur (4,924 texts more than once, one 12 times)."""
    columns = quora_columns
    n_rows = len(columns[0])
    ids = sampler.text_ids(columns)
    assert len(np.unique(ids)) < ids.size  # the test needs repeated texts
    for batch_size in (16, 64):
        batches = sampler.no_duplicates_batches(ids, batch_size, 42, 0)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(n_rows))  # every row once
        for batch in batches:
            texts = [columns[c][i] for i in batch for c in range(len(columns))]
            row_texts = sum(len({columns[c][i] for c in range(len(columns))}) for i in batch)
            assert len(set(texts)) == row_texts, "a text occurs in two rows of one batch"
        assert all(len(b) == batch_size for b in batches[:-3])
        again = sampler.no_duplicates_batches(ids, batch_size, 42, 0)
        assert all(np.array_equal(a, b) for a, b in zip(batches, again)) and len(again) == len(batches)
        other = sampler.no_duplicates_batches(ids, batch_size, 42, 1)
        assert not np.array_equal(np.concatenate(other), rows)


def test_without_repeated_texts_the_batches_are_the_plain_shuffle():
    from minilm_jax.data import batch_indices, steps_per_epoch

    n, b = 103, 16
    ids = sampler.text_ids([[f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]])
    batches = sampler.no_duplicates_batches(ids, b, 42, 3)
    assert len(batches) == steps_per_epoch(n, b)
    for step, batch in enumerate(batches):
        assert np.array_equal(batch, batch_indices(n, b, 42, 3 * steps_per_epoch(n, b) + step))


def test_300k_rows_time(quora_columns):
    """Nine copies of quora_train.tsv's rows, each copy with its own texts: 296,496 rows with
    Quora's real pattern of recurring questions."""
    copies = 9
    big = [[f"{k}:{text}" for k in range(copies) for text in column] for column in quora_columns]
    start = time.perf_counter()
    ids = sampler.text_ids(big)
    batches = sampler.no_duplicates_batches(ids, 64, 42, 0)
    seconds = time.perf_counter() - start
    n = len(big[0])
    print(f"\n{n:,} rows x {len(big)} columns, batch 64: text_ids + one epoch {seconds:.2f} s, {len(batches)} batches")
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert seconds < 30


def test_bad_arguments():
    ids = sampler.text_ids([["a", "b"], ["c", "d"]])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError, match="batch_size"):
            sampler.no_duplicates_batches(ids, bad, 0, 0)
    with pytest.raises(UserError, match="different lengths"):
        sampler.text_ids([["a", "b"], ["c"]])
    assert sampler.no_duplicates_batches(np.zeros((0, 2), np.int64), 4, 0, 0) == []
    assert sampler.no_duplicates_batches(ids, 4, 0, 0, drop_last=True) == []  # fewer rows than a batch
