"""minilm_jax.pairs beyond (sentence1, sentence2, score): hard-negative columns, files without a
score column, positives_only for pair-class files, and swapped duplicates, on real rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_pairs_tsv
from minilm_jax.errors import UserError
from minilm_jax.pairs import Columns, Pairs, load_hub_pairs, load_pairs


@pytest.fixture(scope="module")
def quora_rows(data_dir) -> list[tuple[str, str, float]]:
    return read_pairs_tsv(data_dir / "quora_dev.tsv")


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")
    return path


def triplet_rows(quora_rows, n=40):
    """(anchor, positive, negative, other negative) from Quora duplicates and non-duplicate questions."""
    dup = [r for r in quora_rows if r[2] == 1.0][:n]
    other = [r for r in quora_rows if r[2] == 0.0][:2 * n]
    return [[a, b, other[i][1], other[n + i][0]] for i, (a, b, _) in enumerate(dup)]


def test_anchor_positive_negatives_without_scores(tmp_path, quora_rows):
    rows = triplet_rows(quora_rows)
    path = write_tsv(tmp_path / "triplets.tsv", ["anchor", "positive", "negative", "negative_2"], rows)
    columns = Columns("anchor", "positive", negatives=["negative", "negative_2"])
    pairs = load_pairs(str(path), columns, score_required=False)
    assert not pairs.has_scores and np.array_equal(pairs.scores, np.ones(len(rows)))
    assert pairs.columns() == [[r[c] for r in rows] for c in range(4)]
    assert len(pairs) == len(rows)
    sub = pairs.select([3, 0])
    assert sub.columns() == [[rows[3][c], rows[0][c]] for c in range(4)] and not sub.has_scores
    # The same file without score_required: the score column is required, as before.
    with pytest.raises(UserError, match="has no column 'score'.*--negative-column"):
        load_pairs(str(path), columns)
    # Pairs only (no negatives), still without scores: the MNRL minimum.
    pairs2 = load_pairs(str(path), Columns("anchor", "positive"), score_required=False)
    assert pairs2.columns() == [[r[0] for r in rows], [r[1] for r in rows]]


def test_a_score_column_present_is_still_read_and_checked(tmp_path, quora_rows):
    rows = [[a, b, s] for a, b, s in quora_rows[:30]]
    path = write_tsv(tmp_path / "pairs.tsv", ["sentence1", "sentence2", "score"], rows)
    pairs = load_pairs(str(path), score_required=False)
    assert pairs.has_scores and np.array_equal(pairs.scores, [r[2] for r in rows])
    bad = write_tsv(tmp_path / "bad.tsv", ["sentence1", "sentence2", "score"], rows[:5] + [["a", "b", "high"]])
    with pytest.raises(UserError, match=r"bad.tsv line 7: score 'high' is not a number"):
        load_pairs(str(bad), score_required=False)


def test_negative_column_rows_are_validated_with_line_numbers(tmp_path, quora_rows):
    rows = triplet_rows(quora_rows, 6)
    records = [{"anchor": r[0], "positive": r[1], "negative": r[2]} for r in rows]
    records[4]["negative"] = None
    path = tmp_path / "triplets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(UserError, match=r"triplets.jsonl line 5: negative is NoneType None, not text"):
        load_pairs(str(path), Columns("anchor", "positive", negatives=("negative",)), score_required=False)
    missing = Columns("anchor", "positive", negatives=("hard_negative",))
    with pytest.raises(UserError, match="has no column 'hard_negative'"):
        load_pairs(str(path), missing, score_required=False)


def test_a_column_named_twice_is_refused():
    with pytest.raises(UserError, match="'sentence2' is named twice"):
        Columns(negatives=("sentence2",))
    with pytest.raises(UserError, match="'a' is named twice"):
        Columns("a", "b", "a")


def test_positives_only_keeps_the_duplicates_of_a_pair_class_file(data_dir, quora_rows):
    pairs = load_pairs(str(data_dir / "quora_dev.tsv"), positives_only=True)
    duplicates = [r for r in quora_rows if r[2] == 1.0]
    assert 0 < len(duplicates) < len(quora_rows)
    assert pairs.sentence1 == [r[0] for r in duplicates] and pairs.sentence2 == [r[1] for r in duplicates]
    assert np.all(pairs.scores == 1.0) and pairs.has_scores


def test_positives_only_errors(tmp_path, quora_rows):
    sts = write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [["a", "b", 1], ["c", "d", 0], ["e", "f", 3.8]])
    with pytest.raises(UserError, match=r"sts.tsv line 4: label '3.8' is not 0 or 1"):
        load_pairs(str(sts), positives_only=True)
    no_label = write_tsv(tmp_path / "nolabel.tsv", ["sentence1", "sentence2"], [["a", "b"]])
    with pytest.raises(UserError, match="no label column 'score'.*--score-column"):
        load_pairs(str(no_label), positives_only=True)
    none_positive = write_tsv(tmp_path / "neg.tsv", ["sentence1", "sentence2", "label"],
                              [[a, b, int(s)] for a, b, s in quora_rows if s == 0.0][:5])
    with pytest.raises(UserError, match="no row labelled 1 in column 'label'"):
        load_pairs(str(none_positive), Columns(score="label"), positives_only=True)


def test_add_swapped(tmp_path, quora_rows):
    rows = triplet_rows(quora_rows, 10)
    path = write_tsv(tmp_path / "t.tsv", ["anchor", "positive", "negative"], [r[:3] for r in rows])
    pairs = load_pairs(str(path), Columns("anchor", "positive", negatives=("negative",)), score_required=False,
                       add_swapped=True)
    n = len(rows)
    assert len(pairs) == 2 * n
    assert pairs.sentence1 == [r[0] for r in rows] + [r[1] for r in rows]
    assert pairs.sentence2 == [r[1] for r in rows] + [r[0] for r in rows]
    assert pairs.negatives == ([r[2] for r in rows] * 2,)


def test_positives_only_and_swapped_on_real_data(data_dir, quora_rows):
    pairs = load_pairs(str(data_dir / "quora_dev.tsv"), positives_only=True, add_swapped=True)
    duplicates = [r for r in quora_rows if r[2] == 1.0]
    assert len(pairs) == 2 * len(duplicates)
    assert list(zip(pairs.sentence1, pairs.sentence2)) == [(a, b) for a, b, _ in duplicates] + \
        [(b, a) for a, b, _ in duplicates]


def test_hub_style_dataset_folder(tmp_path, quora_rows):
    """load_hub_pairs takes the same options (a local dataset folder stands in for the hub)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = quora_rows[:50]
    with open(folder / "train.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question1", "question2", "is_duplicate"])
        writer.writerows([[a, b, int(s)] for a, b, s in rows])
    columns = Columns("question1", "question2", "is_duplicate")
    pairs = load_hub_pairs(str(folder), None, "train", columns, positives_only=True, add_swapped=True)
    duplicates = [(a, b) for a, b, s in rows if s == 1.0]
    assert list(zip(pairs.sentence1, pairs.sentence2)) == duplicates + [(b, a) for a, b in duplicates]
    plain = load_hub_pairs(str(folder), None, "train", columns)
    assert isinstance(plain, Pairs) and plain.negatives == () and len(plain) == len(rows)


def test_existing_callers_see_the_same_pairs(data_dir):
    """Positional construction and the three-column reader are unchanged."""
    pairs = load_pairs(str(data_dir / "stsb_dev.tsv"), Columns("sentence1", "sentence2", "score"), False, 5.0)
    rows = read_pairs_tsv(data_dir / "stsb_dev.tsv")
    assert pairs.sentence1 == [r[0] for r in rows] and np.allclose(pairs.scores, [r[2] / 5 for r in rows])
    assert pairs.negatives == () and pairs.has_scores
    assert Pairs(["a"], ["b"], np.array([0.5]), "src").columns() == [["a"], ["b"]]
