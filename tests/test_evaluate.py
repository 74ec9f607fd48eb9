"""evaluate.py against sentence-transformers' EmbeddingSimilarityEvaluator on real STS-B dev,
its other input formats, and its failures (one `error:` line, the right exit status, no traceback)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings

import pytest

from conftest import REPO_ROOT, assert_user_error, run_cli, run_cli_many

EVALUATE = REPO_ROOT / "evaluate.py"
FNS = ["cosine", "dot", "euclidean", "manhattan"]
# sentence-transformers 6.2.0, all-MiniLM-L6-v2, stsb_dev.tsv (1,500 pairs), EmbeddingSimilarityEvaluator.
REFERENCE_SPEARMAN_COSINE = 0.867163
METRIC_TOL = 1e-6


def _evaluator(sentences1, sentences2, scores, fns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old import path still works in 6.x
        from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator
    return EmbeddingSimilarityEvaluator(list(sentences1), list(sentences2), list(scores), similarity_fn_names=fns,
                                        name="", show_progress_bar=False)


def _reference(st_model, rows, fns) -> dict[str, float]:
    return _evaluator([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], fns)(st_model)


def _evaluate_module():
    """evaluate.py imported by path (the name `evaluate` could be another installed package)."""
    spec = importlib.util.spec_from_file_location("minilm_jax_evaluate_cli", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(capsys, argv) -> dict:
    capsys.readouterr()
    _evaluate_module().main(argv)
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, out
    return json.loads(out)


@pytest.fixture(scope="module")
def st_reference(st_model, stsb_dev):
    return _reference(st_model, stsb_dev, FNS)


@pytest.fixture(scope="module")
def stsb_dev_arg(data_dir) -> str:
    """The data path as the README writes it: relative to the repo root."""
    return os.path.relpath(data_dir / "stsb_dev.tsv", REPO_ROOT)


def test_reference_figure(st_reference, stsb_dev, shared_data_figures):
    """The figure of the shared stsb_dev.tsv (other data has other figures); the tests below compare
    evaluate.py with the evaluator on whatever data is in use."""
    assert len(stsb_dev) == 1500
    assert st_reference["spearman_cosine"] == pytest.approx(REFERENCE_SPEARMAN_COSINE, abs=1e-6)


def test_evaluate_cli_matches_evaluator(model_path, stsb_dev_arg, st_reference, stsb_dev):
    proc = run_cli(EVALUATE, "--model", model_path, "--pairs", stsb_dev_arg, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["pairs"] == len(stsb_dev)
    for key in ("pearson_cosine", "spearman_cosine"):
        assert abs(result[key] - st_reference[key]) <= METRIC_TOL, (key, result[key], st_reference[key])
    assert "pearson_dot" not in result  # only what was asked for


def test_other_similarity_functions_match_evaluator(capsys, model_path, stsb_dev_arg, st_reference):
    result = _run_in_process(capsys, ["--model", model_path, "--pairs", stsb_dev_arg, "--json", "--similarity", *FNS])
    for fn in FNS:
        for stat in ("pearson", "spearman"):
            key = f"{stat}_{fn}"
            assert abs(result[key] - st_reference[key]) <= METRIC_TOL, (key, result[key], st_reference[key])
    # The functions really differ (manhattan ranks differently from cosine on this data).
    assert abs(result["spearman_manhattan"] - result["spearman_cosine"]) > 1e-4


def test_table_output(capsys, model_path, tmp_path, stsb_dev):
    path = tmp_path / "small.tsv"
    _write_tsv(path, stsb_dev[:40])
    _evaluate_module().main(["--model", model_path, "--pairs", str(path), "--similarity", "cosine", "dot"])
    out = capsys.readouterr().out.splitlines()
    assert "40 pairs" in out[0]
    assert out[2].split()[0] == "cosine" and out[3].split()[0] == "dot"


# ----------------------------------------------------------------------------- other formats

def _pick_rows(stsb_dev, n=60):
    """Real rows, favouring ones with commas and quotes so that CSV quoting is exercised."""
    tricky = [r for r in stsb_dev if "," in r[0] + r[1] or '"' in r[0] + r[1]]
    plain = [r for r in stsb_dev if r not in tricky]
    rows = tricky[:n // 2] + plain[:n - n // 2]
    assert any('"' in r[0] + r[1] for r in rows) or any("," in r[0] + r[1] for r in rows)
    return rows


def _write_tsv(path, rows, header=("sentence1", "sentence2", "score")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for a, b, s in rows:
            f.write(f"{a}\t{b}\t{s}\n")


def test_csv_with_selected_columns(capsys, model_path, tmp_path, st_model, stsb_dev):
    rows = _pick_rows(stsb_dev)
    path = tmp_path / "pairs.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "gold", "text_b", "text_a"])  # another order, an extra column
        for i, (a, b, s) in enumerate(rows):
            writer.writerow([i, s, b, a])
    result = _run_in_process(capsys, ["--model", model_path, "--pairs", str(path), "--json",
                                      "--sentence1-column", "text_a", "--sentence2-column", "text_b",
                                      "--score-column", "gold", "--similarity", "cosine", "euclidean"])
    expected = _reference(st_model, rows, ["cosine", "euclidean"])
    assert result["pairs"] == len(rows)
    for key in ("pearson_cosine", "spearman_cosine", "pearson_euclidean", "spearman_euclidean"):
        assert abs(result[key] - expected[key]) <= METRIC_TOL, key


def test_jsonl_with_selected_columns(capsys, model_path, tmp_path, st_model, stsb_dev):
    rows = _pick_rows(stsb_dev)[::-1]
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for a, b, s in rows:
            f.write(json.dumps({"left": a, "right": b, "similarity": s, "source": "stsb"}, ensure_ascii=False) + "\n")
    result = _run_in_process(capsys, ["--model", model_path, "--pairs", str(path), "--json",
                                      "--sentence1-column", "left", "--sentence2-column", "right",
                                      "--score-column", "similarity"])
    expected = _reference(st_model, rows, ["cosine"])
    assert result["pairs"] == len(rows)
    for key in ("pearson_cosine", "spearman_cosine"):
        assert abs(result[key] - expected[key]) <= METRIC_TOL, key


def test_tsv_with_quotes_is_read_verbatim(capsys, model_path, tmp_path, st_model, stsb_dev):
    rows = [('"Quoted" start, as in the data', 'He said "no" twice.', 1.0)] + list(stsb_dev[:30])
    path = tmp_path / "quotes.tsv"
    _write_tsv(path, rows)
    result = _run_in_process(capsys, ["--model", model_path, "--pairs", str(path), "--json"])
    expected = _reference(st_model, rows, ["cosine"])
    assert result["pairs"] == len(rows)
    assert abs(result["spearman_cosine"] - expected["spearman_cosine"]) <= METRIC_TOL
    assert abs(result["pearson_cosine"] - expected["pearson_cosine"]) <= METRIC_TOL


# ----------------------------------------------------------------------------- failures
# All failing command lines run once, concurrently, in a module fixture; each test checks one.

def _bad_files(root, stsb_dev) -> dict:
    """case -> (pairs path, words the error line must contain)."""
    rows = stsb_dev[:6]
    header = ("sentence1", "sentence2", "score")

    def tsv(name, body_rows, head=header):
        _write_tsv(root / name, body_rows, head)
        return root / name

    def with_score(i, score):
        changed = list(rows)
        changed[i] = (rows[i][0], rows[i][1], score)
        return changed

    (root / "empty.tsv").write_bytes(b"")
    (root / "bad.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 1.0}) + "\n{not json\n")
    return {
        "missing score column": (tsv("no_score.tsv", rows, ("sentence1", "sentence2", "label")), ["'score'"]),
        "non-numeric score": (tsv("text_score.tsv", with_score(2, "very similar")), ["line 4", "very similar"]),
        "NaN score": (tsv("nan_score.tsv", with_score(1, "nan")), ["line 3"]),
        "infinite score": (tsv("inf_score.tsv", with_score(4, "inf")), ["line 6"]),
        "empty file": (root / "empty.tsv", ["empty"]),
        "header only": (tsv("header_only.tsv", []), ["no rows"]),
        "nonexistent file": (root / "does_not_exist.tsv", ["does not exist"]),
        "constant scores": (tsv("constant.tsv", [(a, b, 3.0) for a, b, _ in rows]), ["same"]),
        "broken jsonl": (root / "bad.jsonl", ["bad.jsonl"]),
    }


USAGE_CASES = {
    "missing --pairs": [],
    "unknown similarity": ["--pairs", "x.tsv", "--similarity", "jaccard"],
    "batch size 0": ["--pairs", "x.tsv", "--batch-size", "0"],
    "unknown dtype": ["--pairs", "x.tsv", "--dtype", "float16"],
    "unknown flag": ["--pairs", "x.tsv", "--no-such-flag"],
}


@pytest.fixture(scope="module")
def failures(tmp_path_factory, stsb_dev, model_path):
    root = tmp_path_factory.mktemp("bad_inputs")
    files = _bad_files(root, stsb_dev)
    ok_pairs = root / "ok.tsv"
    _write_tsv(ok_pairs, stsb_dev[:10])
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    commands = {case: [EVALUATE, "--model", model_path, "--pairs", path, "--json"] for case, (path, _) in files.items()}
    commands["not a model"] = [EVALUATE, "--model", not_a_model, "--pairs", ok_pairs, "--json"]
    commands["missing model"] = [EVALUATE, "--model", root / "missing_model", "--pairs", ok_pairs, "--json"]
    commands.update({case: [EVALUATE, *argv] for case, argv in USAGE_CASES.items()})
    return files, run_cli_many(commands)


@pytest.mark.parametrize("case", ["missing score column", "non-numeric score", "NaN score", "infinite score",
                                  "empty file", "header only", "nonexistent file", "constant scores", "broken jsonl"])
def test_bad_pairs_file_is_one_line_error(case, failures):
    files, procs = failures
    path, needles = files[case]
    line = assert_user_error(procs[case], 1, *needles)
    assert procs[case].stdout == ""
    if case not in ("nonexistent file", "constant scores"):  # constant scores are a property of the data, not a row
        assert path.name in line, line


@pytest.mark.parametrize("case, needle", [("not a model", "not a model folder"), ("missing model", "does not exist")])
def test_model_folder_errors(case, needle, failures):
    _, procs = failures
    assert_user_error(procs[case], 1, needle)


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_usage_errors_exit_2(case, failures):
    _, procs = failures
    assert_user_error(procs[case], 2)
