"""train.py with the losses beyond the recipe (issue: losses and evaluators, exact across devices).

- MultipleNegativesRankingLoss with a hard-negative column, negatives gathered from every device:
  8 devices train exactly as 1 device at the same global batch (dropout off), also with a short
  last batch that leaves devices empty.
- CachedMultipleNegativesRankingLoss (GradCache, micro-batches of --mini-batch-size sentences)
  trains exactly as MultipleNegativesRankingLoss, on 1 device and on 8 against 1.
- The no-duplicates batch sampler keeps every text once per batch in a real run's batches.
- Bad loss options are usage errors before anything is written.

Tiny model (tests/tiny_model.py), real Quora rows; each run a subprocess (the fake device count
must be set before jax is imported).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_user_error
from test_train_multidevice import assert_ok, load_tensors, run_train_parallel, step_records, tiny  # noqa: F401

LOSS_RTOL = 1e-5
# Adam moves a weight by about lr (5e-5) per step whatever its gradient's size, so a coordinate whose
# gradient is float noise (GradCache sums in another order) can land a fraction of lr away: 2.1e-6
# was the largest seen, on 1 of 2M word-embedding values after 12 steps.
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def triplets(data_dir, tmp_path_factory):
    """(anchor, positive, negative) rows from real Quora duplicates: the negative is the sentence2 of
    another, non-duplicate row. Some questions recur, as in the real file."""
    from conftest import read_pairs_tsv

    rows = read_pairs_tsv(data_dir / "quora_train.tsv")[:400]
    positives = [(a, b) for a, b, s in rows if s == 1.0]
    negatives = [b for _, b, s in rows if s == 0.0]
    path = tmp_path_factory.mktemp("triplets") / "triplets.tsv"
    # Written as the shared files are: tab-separated, no quoting (their texts hold no tab or newline).
    lines = ["anchor\tpositive\tnegative"] + [f"{a}\t{b}\t{n}" for (a, b), n in zip(positives, negatives)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, min(len(positives), len(negatives))


def mnrl_args(tiny, train, out, loss="MultipleNegativesRankingLoss", *extra) -> list:
    return ["--model", tiny, "--train-file", train, "--output-dir", out, "--loss", loss,
            "--sentence1-column", "anchor", "--sentence2-column", "positive", "--negative-column", "negative",
            "--batch-size", 16, "--data-shards", 8, "--no-dropout", "--log-every", 1, "--checkpoint-every", 1000,
            "--no-progress", *extra]


def assert_same(a, b, n_steps: int) -> None:
    rec_a, rec_b = step_records(a), step_records(b)
    assert [r["step"] for r in rec_a] == [r["step"] for r in rec_b] == list(range(1, n_steps + 1))
    np.testing.assert_allclose([r["loss"] for r in rec_b], [r["loss"] for r in rec_a], rtol=LOSS_RTOL)
    np.testing.assert_allclose([r["grad_norm"] for r in rec_b], [r["grad_norm"] for r in rec_a], rtol=1e-4)
    wa, wb = load_tensors(a / "model"), load_tensors(b / "model")
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)


def test_gathered_negatives_8_devices_train_as_1_device(tiny, triplets, tmp_path):
    """Each anchor is scored against the positives and negatives of the whole global batch. The
    rows (~95) make each epoch's last batch short: some of the 8 devices hold no row there."""
    train, n_rows = triplets
    assert n_rows % 16 and n_rows % 16 < 8
    steps = 2 * -(-n_rows // 16)  # two epochs, each ending with the short batch
    one, eight, cached = tmp_path / "one", tmp_path / "eight", tmp_path / "cached8"
    runs = run_train_parallel([
        (1, mnrl_args(tiny, train, one, "MultipleNegativesRankingLoss", "--max-steps", steps)),
        (8, mnrl_args(tiny, train, eight, "MultipleNegativesRankingLoss", "--max-steps", steps)),
        (8, mnrl_args(tiny, train, cached, "CachedMultipleNegativesRankingLoss", "--max-steps", steps,
                      "--mini-batch-size", 2))], tmp_path / "logs")
    for proc in runs:
        assert_ok(proc)
    assert_same(one, eight, steps)
    assert_same(one, cached, steps)


def test_cached_loss_trains_as_the_uncached_one(tiny, data_dir, tmp_path):
    """1 device, pair-class rows kept where the label is 1 (--positives-only), the no-duplicates
    sampler, several steps per dispatch: GradCache's micro-batches give MNRL's steps."""
    from test_train_multidevice import write_subset

    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 200)
    common = ["--model", tiny, "--train-file", train, "--positives-only", "--batch-size", 32, "--no-dropout",
              "--log-every", 1, "--max-steps", 5, "--no-progress", "--checkpoint-every", 1000]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    runs = run_train_parallel([
        (1, [*common, "--output-dir", plain, "--loss", "MultipleNegativesRankingLoss"]),
        (1, [*common, "--output-dir", cached, "--loss", "CachedMultipleNegativesRankingLoss", "--mini-batch-size", 8,
             "--steps-per-dispatch", 2, "--checkpoint-every", 1000])], tmp_path / "logs")
    for proc in runs:
        assert_ok(proc)
    assert_same(plain, cached, 5)


@pytest.mark.parametrize("extra, needles", [
    (["--loss", "CoSENTLoss", "--negative-column", "score"], ["CoSENTLoss", "2 text columns"]),
    (["--loss", "CoSENTLoss", "--loss-param", "scale=high"], ["scale", "float"]),
    (["--loss-param", "margin=1"], ["margin", "CosineSimilarityLoss"]),
    (["--mini-batch-size", "8"], ["--mini-batch-size", "Cached"]),
    (["--loss", "MultipleNegativesRankingLoss", "--loss-param", "directions=doc_to_doc"], ["directions"]),
], ids=["negatives-for-a-pair-loss", "bad-value", "unknown-param", "mini-batch-not-cached", "bad-directions"])
def test_bad_loss_options_are_usage_errors(tiny, data_dir, tmp_path, extra, needles):
    from test_train_multidevice import write_subset

    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 20)
    out = tmp_path / "out"
    (proc,) = run_train_parallel([(1, ["--model", tiny, "--train-file", train, "--output-dir", out, "--no-progress",
                                       *extra])], tmp_path / "logs")
    assert_user_error(proc, 2, *needles)
    assert not out.exists()
