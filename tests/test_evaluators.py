"""minilm_jax/evaluators.py against sentence-transformers' evaluators (6.2, and 6.3 since the test stack was locked), and evaluate.py --evaluator.

The parity tests embed 300 real rows of quora_dev.tsv once with the real model and give the same
embeddings to both libraries: sentence-transformers' evaluators get a stand-in model whose `encode`
(and `encode_query`/`encode_document`) looks the texts up in that table. Its evaluators call nothing
else on the model but `model_card_data.set_evaluation_metrics`, a no-op here.

Tolerance, on the same embeddings: every metric within 1e-6 of sentence-transformers'; thresholds,
which are float32 similarity scores, within 1e-6 relative to max(1, |value|). Both libraries compute
the scores in float32 but sum in different orders (numpy's pairwise sum and OpenBLAS against torch's
reductions), so a score can differ in its last bits: a manhattan distance near 11 (float32 spacing
9.5e-7 there) came out 2 steps apart on quora_dev. The counts behind accuracy, F1, precision, recall,
MCC and the rankings agree exactly here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import warnings

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error, read_pairs_tsv

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch
    from sentence_transformers.sentence_transformer.evaluation import (
        BinaryClassificationEvaluator as STBinary,
        InformationRetrievalEvaluator as STRetrieval,
        ParaphraseMiningEvaluator as STMining,
    )
    from sentence_transformers.util import cos_sim

from minilm_jax import evaluators as E
from minilm_jax.pairs import Pairs

EVALUATE = REPO_ROOT / "evaluate.py"
FNS = ["cosine", "dot", "euclidean", "manhattan"]
N_ROWS = 300
TOL = 1e-6
_THRESHOLD_KEYS = ("threshold",)


# ----------------------------------------------------------------------------- shared data

class FixedEmbeddings:
    """Stands in for a SentenceTransformer: the embeddings of each text are given."""

    similarity_fn_name = "cosine"

    class model_card_data:  # noqa: N801 (the attribute name sentence-transformers uses)
        @staticmethod
        def set_evaluation_metrics(*args, **kwargs):
            pass

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, sentences, convert_to_tensor=False, convert_to_numpy=True, **kwargs):
        out = np.stack([self.table[s] for s in sentences]).astype(np.float32)
        return torch.from_numpy(out) if convert_to_tensor else out

    encode_query = encode_document = encode

    def similarity(self, a, b):
        return cos_sim(a, b)


def assert_same_metrics(ours: dict, theirs: dict, tol: float = TOL):
    assert list(ours) == list(theirs), (sorted(set(ours) ^ set(theirs)), list(ours), list(theirs))
    for key, value in theirs.items():
        bound = tol * max(1.0, abs(value)) if key.endswith(_THRESHOLD_KEYS) else tol
        assert abs(ours[key] - value) <= bound, (key, ours[key], value)
        assert isinstance(ours[key], float), (key, type(ours[key]))


@pytest.fixture(scope="module")
def rows(data_dir):
    return read_pairs_tsv(data_dir / "quora_dev.tsv")[:N_ROWS]


@pytest.fixture(scope="module")
def pairs(rows) -> Pairs:
    return Pairs([r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows]), "quora_dev.tsv")


@pytest.fixture(scope="module")
def table(pairs, jax_model) -> dict[str, np.ndarray]:
    import minilm_jax

    texts = list(dict.fromkeys(pairs.sentence1 + pairs.sentence2))
    return dict(zip(texts, minilm_jax.encode(texts, jax_model)))


@pytest.fixture(scope="module")
def fixed(table) -> FixedEmbeddings:
    return FixedEmbeddings(table)


def _emb(table, texts) -> np.ndarray:
    return np.stack([table[t] for t in texts])


def _st_retrieval(data: E.RetrievalData, **kwargs) -> STRetrieval:
    return STRetrieval(dict(zip(data.query_ids, data.queries)), dict(zip(data.corpus_ids, data.corpus)),
                       {q: set(v) for q, v in data.relevant.items()}, write_csv=False, **kwargs)


def _st_mining(data: E.MiningData, **kwargs) -> STMining:
    return STMining(dict(zip(data.ids, data.sentences)), list(data.duplicates), write_csv=False, **kwargs)


# ----------------------------------------------------------------------------- binary

def _st_binary(pairs, fns=None) -> STBinary:
    return STBinary(list(pairs.sentence1), list(pairs.sentence2), [int(s) for s in pairs.scores],
                    similarity_fn_names=fns, write_csv=False)


@pytest.mark.parametrize("fns", [None, FNS], ids=["default", "all four"])
def test_binary_matches_st(fns, pairs, table, fixed):
    evaluator = E.build_evaluator("binary", pairs=pairs, similarity_fns=fns)
    ours = E.binary_metrics(_emb(table, pairs.sentence1), _emb(table, pairs.sentence2), evaluator.labels,
                            evaluator.similarity_fns)
    st = _st_binary(pairs, fns)
    theirs = st(fixed)
    assert_same_metrics(ours, theirs)
    assert evaluator.primary_metric == st.primary_metric == ("max_ap" if fns else "cosine_ap")
    assert len(ours) == (8 if fns is None else 40)
    # Not degenerate: the thresholds were searched, and the functions differ.
    assert 0.5 < ours["cosine_accuracy"] < 1 and 0.5 < ours["cosine_ap"] < 1
    if fns:
        assert ours["manhattan_accuracy_threshold"] > 1 > ours["cosine_accuracy_threshold"]


def test_binary_threshold_search_matches_st():
    """The threshold searches and AP/MCC on scores with many ties, both directions, and the case where
    predicting every pair dissimilar is best; sklearn's functions for AP and MCC."""
    from sklearn.metrics import average_precision_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        labels = rng.integers(0, 2, n)
        scores = (np.round(rng.random(n) * rng.choice([3, 10, 1000]), 0) / 7).astype(np.float32)
        if trial % 5 == 0:  # negatives above positives: "all dissimilar" wins the accuracy
            scores = np.where(labels == 1, -1 - scores, scores).astype(np.float32)
        for greater in (True, False):
            assert E.best_accuracy(scores, labels, greater) == pytest.approx(
                STBinary.find_best_acc_and_threshold(scores, labels, greater), abs=0), (trial, greater)
            assert E.best_f1(scores, labels, greater) == pytest.approx(
                STBinary.find_best_f1_and_threshold(scores, labels, greater), abs=0), (trial, greater)
        if 0 < labels.sum() < n:
            assert E.average_precision(labels, scores) == average_precision_score(labels, scores)
            predicted = scores >= np.median(scores)
            assert E.matthews_corrcoef(labels, predicted) == matthews_corrcoef(labels, predicted)


# ----------------------------------------------------------------------------- retrieval

@pytest.mark.parametrize("fn", ["cosine", "dot"])
def test_retrieval_from_pairs_matches_st(fn, pairs, table, fixed):
    evaluator = E.build_evaluator("retrieval", pairs=pairs, similarity_fns=[fn])
    data = evaluator.data
    ours = E.retrieval_metrics(_emb(table, data.queries), _emb(table, data.corpus), data, fn)
    kwargs = {} if fn == "cosine" else {"score_functions": {"dot": lambda a, b: a @ b.T}}
    st = _st_retrieval(data, **kwargs)
    assert_same_metrics(ours, st(fixed))
    assert evaluator.primary_metric == st.primary_metric == f"{fn}_ndcg@10"
    assert len(ours) == 15
    assert 0.5 < ours[f"{fn}_mrr@10"] < 1  # a real ranking, neither trivial nor broken


def test_retrieval_ties_broken_by_corpus_id_as_st(fixed):
    """Identical embeddings under many ids, ties across the 100th place: ST ranks by (-score, corpus id)."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 16)).astype(np.float32)
    corpus = {f"doc{i:03d}": f"text {i}" for i in range(250)}
    table = {f"text {i}": vectors[i % 3] for i in range(250)}  # three groups of ~83 equal documents
    queries = {f"q{i}": f"query {i}" for i in range(6)}
    table.update({f"query {i}": vectors[i] + 0.1 * vectors[(i + 1) % 6] for i in range(6)})
    relevant = {f"q{i}": {f"doc{(7 * i + 3 * j) % 250:03d}" for j in range(1 + i % 3)} for i in range(6)}
    data = E.RetrievalData(tuple(queries), tuple(queries.values()), tuple(corpus), tuple(corpus.values()),
                           {q: frozenset(v) for q, v in relevant.items()})
    ours = E.retrieval_metrics(_emb(table, data.queries), _emb(table, data.corpus), data)
    assert_same_metrics(ours, _st_retrieval(data)(FixedEmbeddings(table)), tol=0)


def test_retrieval_metrics_of_known_rankings():
    """Hand-made embeddings with rankings worked out by hand."""
    eye = np.eye(8, dtype=np.float32)
    corpus_ids = ("a", "b", "c", "d", "e")
    corpus_emb = eye[:5]
    # q1 finds a first (relevant); q2's relevant docs b, d come 1st and 3rd (c 2nd).
    query_emb = np.stack([eye[0], 1.0 * eye[1] + 0.6 * eye[2] + 0.3 * eye[3]])
    data = E.RetrievalData(("q1", "q2"), ("", ""), corpus_ids, ("",) * 5,
                           {"q1": frozenset({"a"}), "q2": frozenset({"b", "d"})})
    m = E.retrieval_metrics(query_emb, corpus_emb, data)
    assert m["cosine_mrr@10"] == 1.0 and m["cosine_accuracy@1"] == 1.0
    assert m["cosine_precision@1"] == 1.0 and m["cosine_recall@1"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["cosine_precision@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["cosine_recall@3"] == 1.0 and m["cosine_recall@10"] == 1.0
    assert m["cosine_precision@10"] == pytest.approx((1 / 10 + 2 / 10) / 2)  # only 5 documents, ST divides by k
    assert m["cosine_map@100"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    ideal = 1 + 1 / np.log2(3)
    assert m["cosine_ndcg@10"] == pytest.approx((1 + (1 + 1 / np.log2(4)) / ideal) / 2)
    # A perfect model: every query's relevant document is its own direction.
    perfect = E.RetrievalData(("x", "y", "z"), ("",) * 3, corpus_ids, ("",) * 5,
                              {"x": frozenset({"c"}), "y": frozenset({"e"}), "z": frozenset({"a"})})
    m = E.retrieval_metrics(np.stack([eye[2], eye[4], eye[0]]), corpus_emb, perfect)
    for key in ("mrr@10", "ndcg@10", "map@100", "accuracy@1", "precision@1", "recall@1", "recall@10"):
        assert m[f"cosine_{key}"] == 1.0, key


def test_retrieval_from_pairs_builder():
    p = Pairs(["q a", "q b", "q a", "q c", "q b", "q d"], ["d1", "d2", "d3", "d1", "d2", "q a"],
              np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), "hand.tsv")
    data = E.retrieval_from_pairs(p)
    assert data.corpus_ids == ("0", "1", "2", "3") and data.corpus == ("d1", "d2", "d3", "q a")
    assert data.query_ids == ("q0", "q1") and data.queries == ("q a", "q b")  # q c, q d have no positive
    assert data.relevant == {"q0": frozenset({"0", "2"}), "q1": frozenset({"1"})}  # duplicate row merged
    # A threshold for graded scores; ids are zero-padded so their string order is their order.
    graded = Pairs([f"s{i}" for i in range(12)], [f"t{i}" for i in range(12)], np.arange(12) / 11 * 5, "g.tsv")
    data = E.retrieval_from_pairs(graded, positive_threshold=4)
    assert data.corpus_ids[:3] == ("00", "01", "02") and len(data.query_ids) == 3
    assert data.relevant["q0"] == frozenset({"09"})
    with pytest.raises(E.UserError, match="no pair with score >= 1"):
        E.retrieval_from_pairs(Pairs(["a"], ["b"], np.array([0.0]), "neg.tsv"))


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_retrieval_files_in_three_formats(tmp_path, table, fixed):
    """One task written as BEIR JSON Lines (`_id`, integer ids, titles), TSV and CSV reads the same,
    and its metrics equal ST's given the dictionaries the BEIR example builds."""
    texts = list(table)
    queries = {"1": texts[0], "2": texts[2], "3": texts[4], "4": texts[6]}
    corpus = {f"d{i}": texts[i] for i in range(1, 60)}
    qrels = [("1", "d1", 1), ("1", "d9", 2), ("2", "d3", 1), ("3", "d5", 0), ("4", "d7", 1), ("4", "d8", 1)]
    jl = tmp_path / "jsonl"
    jl.mkdir()
    _write(jl / "queries.jsonl", "".join(json.dumps({"_id": int(k), "text": v}) + "\n" for k, v in queries.items()))
    _write(jl / "corpus.jsonl", "".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in corpus.items()))
    _write(jl / "qrels.tsv", "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in qrels))
    a = E.load_retrieval(str(jl / "queries.jsonl"), str(jl / "corpus.jsonl"), str(jl / "qrels.tsv"))
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    _write(tsv / "q.tsv", "id\ttext\n" + "".join(f"{k}\t{v}\n" for k, v in queries.items()))
    _write(tsv / "c.tsv", "id\ttext\n" + "".join(f"{k}\t{v}\n" for k, v in corpus.items()))
    _write(tsv / "r.csv", "query-id,corpus-id\n" + "".join(f"{q},{c}\n" for q, c, s in qrels if s > 0))
    b = E.load_retrieval(str(tsv / "q.tsv"), str(tsv / "c.tsv"), str(tsv / "r.csv"))
    for data in (a, b):
        assert data.query_ids == ("1", "2", "4")  # query 3's only judgement has score 0
        assert data.queries == (texts[0], texts[2], texts[6]) and data.corpus_ids == tuple(corpus)
        assert data.relevant == {"1": frozenset({"d1", "d9"}), "2": frozenset({"d3"}), "4": frozenset({"d7", "d8"})}
    st_relevant = {"1": {"d1", "d9"}, "2": {"d3"}, "4": {"d7", "d8"}}
    theirs = STRetrieval(queries, corpus, st_relevant, write_csv=False)(fixed)
    assert_same_metrics(E.retrieval_metrics(_emb(table, a.queries), _emb(table, a.corpus), a), theirs)
    # A BEIR title goes before the text.
    _write(jl / "titled.jsonl", json.dumps({"_id": "d1", "title": "Title", "text": "body"}) + "\n")
    _write(jl / "q1.jsonl", json.dumps({"_id": "1", "text": "x"}) + "\n")
    _write(jl / "r1.tsv", "query-id\tcorpus-id\n1\td1\n")
    titled = E.load_retrieval(str(jl / "q1.jsonl"), str(jl / "titled.jsonl"), str(jl / "r1.tsv"))
    assert titled.corpus == ("Title body",)


# ----------------------------------------------------------------------------- paraphrase mining

def test_mining_from_pairs_builder():
    p = Pairs(["a", "b", "a", "c", "e"], ["b", "c", "d", "a", "e"], np.array([1.0, 0.0, 1.0, 1.0, 1.0]), "m.tsv")
    data = E.mining_from_pairs(p)
    assert data.sentences == ("a", "b", "c", "d", "e") and data.ids == ("0", "1", "2", "3", "4")
    assert data.duplicates == (("0", "1"), ("0", "2"), ("0", "3"))  # the e-e pair cannot be mined: left out
    with pytest.raises(E.UserError, match="no pair of two different texts"):
        E.mining_from_pairs(Pairs(["a", "b"], ["a", "c"], np.array([1.0, 0.0]), "self.tsv"))


@pytest.mark.parametrize("top_k, max_pairs", [(E.MINING_TOP_K, E.MINING_MAX_PAIRS), (10, 800), (3, 60)],
                         ids=["defaults", "top10-max800", "top3-max60"])
def test_mining_matches_st(top_k, max_pairs, pairs, table, fixed):
    """ST's defaults, and small top_k/max_pairs so that the candidate heap evicts (600 sentences give
    ~30,000 candidate pairs, fewer than the default max_pairs)."""
    evaluator = dataclasses.replace(E.build_evaluator("paraphrase-mining", pairs=pairs), top_k=top_k,
                                    max_pairs=max_pairs)
    data = evaluator.data
    ours = E.paraphrase_mining_metrics(_emb(table, data.sentences), data, evaluator.top_k, evaluator.max_pairs)
    st = _st_mining(data, top_k=top_k, max_pairs=max_pairs)
    assert_same_metrics(ours, st(fixed))
    assert evaluator.primary_metric == st.primary_metric == "average_precision"
    assert evaluator.card_config() == st.get_config_dict()
    assert E.build_evaluator("paraphrase-mining", pairs=pairs).card_config() == {
        "add_transitive_closure": False, "max_pairs": 500000, "top_k": 100}
    assert ours["average_precision"] > 0.3 and 0 < ours["recall"] <= 1


# ----------------------------------------------------------------------------- evaluate.py

def _evaluate_module():
    spec = importlib.util.spec_from_file_location("minilm_jax_evaluate_cli", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, argv) -> subprocess.CompletedProcess:
    """evaluate.py's main in this process, as a CompletedProcess (for assert_user_error)."""
    capsys.readouterr()
    code = 0
    try:
        _evaluate_module().main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def _json(capsys, argv) -> dict:
    proc = _run(capsys, [*argv, "--json"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def _write_pairs(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("sentence1\tsentence2\tscore\n")
        for a, b, s in rows:
            f.write(f"{a}\t{b}\t{s}\n")
    return path


N_CLI_ROWS = 150


@pytest.fixture(scope="module")
def cli_rows(rows):
    return rows[:N_CLI_ROWS]


@pytest.fixture(scope="module")
def cli_file(cli_rows, tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("evaluators") / "quora150.tsv", cli_rows)


def _metrics_only(result: dict, evaluator) -> dict:
    return {k: v for k, v in result.items() if k not in (*evaluator.sizes(), "model", "file")}


def test_cli_each_evaluator_matches_st_with_its_own_model(capsys, model_path, cli_file, cli_rows, st_model):
    """evaluate.py --evaluator X --json on 150 real rows against ST's evaluators given ST's own
    model's embeddings of the same texts (they differ from ours by ~2e-7, which moves no count or
    ranking on these rows)."""
    p = Pairs([r[0] for r in cli_rows], [r[1] for r in cli_rows], np.array([r[2] for r in cli_rows]), str(cli_file))
    texts = list(dict.fromkeys(p.sentence1 + p.sentence2))
    st_fixed = FixedEmbeddings(dict(zip(texts, st_model.encode(texts, batch_size=32, convert_to_numpy=True))))
    for name, st in [("binary", _st_binary(p, FNS)),
                     ("retrieval", _st_retrieval(E.retrieval_from_pairs(p))),
                     ("paraphrase-mining", _st_mining(E.mining_from_pairs(p)))]:
        argv = ["--model", model_path, "--pairs", cli_file, "--evaluator", name]
        result = _json(capsys, argv + (["--similarity", *FNS] if name == "binary" else []))
        evaluator = E.build_evaluator(name, pairs=p, similarity_fns=FNS if name == "binary" else None)
        assert {k: result[k] for k in evaluator.sizes()} == evaluator.sizes()
        assert result["model"] == model_path and result["file"] == str(cli_file)
        assert_same_metrics(_metrics_only(result, evaluator), st(st_fixed))


def test_cli_similarity_default_unchanged(capsys, model_path, cli_rows, tmp_path, table):
    """--evaluator similarity is the default and prints what evaluate.py always printed."""
    from minilm_jax.metrics import similarity_correlations

    rows = cli_rows[:60]
    path = _write_pairs(tmp_path / "sixty.tsv", rows)
    plain = _json(capsys, ["--model", model_path, "--pairs", path])
    named = _json(capsys, ["--model", model_path, "--pairs", path, "--evaluator", "similarity"])
    assert list(plain) == ["pearson_cosine", "spearman_cosine", "pairs", "model", "file"]
    assert plain == named and plain["pairs"] == 60
    expected = similarity_correlations(_emb(table, [r[0] for r in rows]), _emb(table, [r[1] for r in rows]),
                                       [r[2] for r in rows])
    assert plain["spearman_cosine"] == pytest.approx(expected["spearman_cosine"], abs=TOL)


def test_cli_tables_and_retrieval_files(capsys, model_path, cli_rows, tmp_path):
    path = _write_pairs(tmp_path / "small.tsv", cli_rows[:40])
    out = _run(capsys, ["--model", model_path, "--pairs", path, "--evaluator", "binary", "--similarity", "cosine",
                        "manhattan"]).stdout.splitlines()
    assert "40 pairs" in out[0] and out[1].split()[:3] == ["similarity", "accuracy", "threshold"]
    assert [line.split()[0] for line in out[2:]] == ["cosine", "manhattan", "max"]
    out = _run(capsys, ["--model", model_path, "--pairs", path, "--evaluator", "retrieval"]).stdout.splitlines()
    assert "queries" in out[0] and "documents" in out[0]
    assert [line for line in out if line.startswith("cosine_ndcg@10")][0].endswith("(primary)")
    out = _run(capsys, ["--model", model_path, "--pairs", path, "--evaluator", "paraphrase-mining"]).stdout.splitlines()
    assert "sentences" in out[0] and out[1].startswith("average_precision")
    # The three-file layout: a query per question, its duplicate relevant; an easy task.
    positives = [r for r in cli_rows[:30] if r[2] == 1][:4]
    q = _write(tmp_path / "q.jsonl", "".join(json.dumps({"_id": f"q{i}", "text": a}) + "\n"
                                             for i, (a, _, _) in enumerate(positives)))
    c = _write(tmp_path / "c.tsv", "id\ttext\n" + "".join(f"d{i}\t{r[1]}\n" for i, r in enumerate(cli_rows[:30])))
    rel = _write(tmp_path / "r.tsv", "query-id\tcorpus-id\n" + "".join(
        f"q{i}\td{cli_rows.index(r)}\n" for i, r in enumerate(positives)))
    result = _json(capsys, ["--model", model_path, "--evaluator", "retrieval", "--queries", q, "--corpus", c,
                            "--qrels", rel])
    assert result["queries"] == 4 and result["corpus"] == 30 and result["qrels_file"] == rel
    assert result["cosine_recall@10"] == 1.0 and result["cosine_mrr@10"] > 0.7


@pytest.mark.slow
def test_cli_binary_on_quora_dev_equals_st(capsys, model_path, data_dir, st_model):
    """The whole quora_dev.tsv (5,000 pairs, 9,779 distinct texts): evaluate.py --evaluator binary against
    BinaryClassificationEvaluator with ST's own model. The embeddings differ by up to ~2.5e-7 between
    the libraries, so a similarity (a threshold) moves by about that much; a threshold must agree to
    1e-6 relative to max(1, |value|) (a manhattan distance near 11 has a float32 spacing of 9.5e-7).
    Accuracy, F1, precision, recall and MCC count pairs on either side of a threshold and would only
    move if two pairs of different labels swapped places across it; AP moves by ~1/(2,443 x rank) per
    swap of a positive and a negative anywhere. All stay within 1e-6 here (measured: see the issue)."""
    from conftest import read_pairs_tsv as read

    rows = read(data_dir / "quora_dev.tsv")
    result = _json(capsys, ["--model", model_path, "--pairs", data_dir / "quora_dev.tsv", "--evaluator", "binary",
                            "--similarity", *FNS])
    st = STBinary([r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows], similarity_fn_names=FNS,
                  write_csv=False)
    theirs = st(st_model)
    assert result["pairs"] == 5000
    ours = {k: v for k, v in result.items() if k not in ("pairs", "model", "file")}
    assert_same_metrics(ours, theirs)
    assert ours["cosine_ap"] == pytest.approx(0.8387, abs=1e-4)  # the base model on quora_dev


# ----------------------------------------------------------------------------- bad input

def _bad_inputs(root, rows):
    def w(name, text):
        return _write(root / name, text)

    stsb_like = _write_pairs(root / "graded.tsv", [(a, b, 3.5 if i == 2 else float(i % 2)) for i, (a, b, _) in
                                                    enumerate(rows[:6])])
    one_class = _write_pairs(root / "ones.tsv", [(a, b, 1.0) for a, b, _ in rows[:6]])
    negatives = _write_pairs(root / "negatives.tsv", [(a, b, 0.0) for a, b, _ in rows[:6]])
    q = w("q.jsonl", '{"_id": "1", "text": "a question"}\n{"_id": "2", "text": "another"}\n')
    c = w("c.jsonl", '{"_id": "d1", "text": "a document"}\n')
    r = w("r.tsv", "query-id\tcorpus-id\n1\td1\n")
    return {
        "binary graded labels": (["--pairs", stsb_like, "--evaluator", "binary"], 1, ["graded.tsv line 4", "3.5", "0 or 1"]),
        "binary one class": (["--pairs", one_class, "--evaluator", "binary"], 1, ["ones.tsv", "both labels"]),
        "retrieval no positives": (["--pairs", negatives, "--evaluator", "retrieval"], 1, ["no pair with score >= 1"]),
        "mining no positives": (["--pairs", negatives, "--evaluator", "paraphrase-mining"], 1, ["duplicates"]),
        "queries without id": (["--queries", w("noid.jsonl", '{"text": "x"}\n'), "--corpus", c, "--qrels", r,
                                "--evaluator", "retrieval"], 1, ["noid.jsonl", "'_id' or 'id'"]),
        "corpus without text": (["--queries", q, "--corpus", w("notext.tsv", "id\tbody\nd1\tx\n"), "--qrels", r,
                                 "--evaluator", "retrieval"], 1, ["notext.tsv", "'text'", "'body'"]),
        "qrels without corpus-id": (["--queries", q, "--corpus", c, "--qrels", w("r2.tsv", "query-id\tdoc\n1\td1\n"),
                                     "--evaluator", "retrieval"], 1, ["r2.tsv", "'corpus-id'"]),
        "qrels unknown document": (["--queries", q, "--corpus", c, "--qrels", w("r3.tsv", "query-id\tcorpus-id\n1\td9\n"),
                                    "--evaluator", "retrieval"], 1, ["r3.tsv line 2", "'d9'", "c.jsonl"]),
        "qrels unknown query": (["--queries", q, "--corpus", c, "--qrels", w("r4.tsv", "query-id\tcorpus-id\n7\td1\n"),
                                 "--evaluator", "retrieval"], 1, ["r4.tsv line 2", "'7'"]),
        "qrels all zero": (["--queries", q, "--corpus", c, "--qrels", w("r5.tsv", "query-id\tcorpus-id\tscore\n1\td1\t0\n"),
                            "--evaluator", "retrieval"], 1, ["r5.tsv", "no document relevant"]),
        "duplicate query id": (["--queries", w("dup.jsonl", '{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n'),
                                "--corpus", c, "--qrels", r, "--evaluator", "retrieval"], 1, ["dup.jsonl line 2", "line 1"]),
        "broken jsonl": (["--queries", w("broken.jsonl", '{"_id": "1", "text": "a"}\n{oops\n'), "--corpus", c,
                          "--qrels", r, "--evaluator", "retrieval"], 1, ["broken.jsonl line 2"]),
        "null text": (["--queries", q, "--corpus", w("null.jsonl", '{"_id": "d1", "text": null}\n'), "--qrels", r,
                       "--evaluator", "retrieval"], 1, ["null.jsonl line 1", "not a string"]),
        "missing queries file": (["--queries", root / "nope.jsonl", "--corpus", c, "--qrels", r, "--evaluator",
                                  "retrieval"], 1, ["nope.jsonl", "does not exist"]),
        "ragged tsv": (["--queries", q, "--corpus", w("ragged.tsv", "id\ttext\nd1\tx\ty\n"), "--qrels", r,
                        "--evaluator", "retrieval"], 1, ["ragged.tsv line 2", "3 fields"]),
        # usage errors: exit 2
        "unknown evaluator": (["--pairs", one_class, "--evaluator", "clustering"], 2, ["clustering"]),
        "queries for binary": (["--queries", q, "--corpus", c, "--qrels", r, "--evaluator", "binary"], 2,
                               ["--queries", "retrieval"]),
        "queries alone": (["--queries", q, "--evaluator", "retrieval"], 2, ["--corpus", "--qrels"]),
        "pairs and queries": (["--pairs", one_class, "--queries", q, "--corpus", c, "--qrels", r, "--evaluator",
                               "retrieval"], 2, ["not both"]),
        "retrieval without data": (["--evaluator", "retrieval"], 2, ["--pairs", "--queries"]),
        "retrieval two functions": (["--pairs", one_class, "--evaluator", "retrieval", "--similarity", "cosine", "dot"],
                                    2, ["one function"]),
        "retrieval euclidean": (["--pairs", one_class, "--evaluator", "retrieval", "--similarity", "euclidean"], 2,
                                ["cosine or dot"]),
        "mining dot": (["--pairs", one_class, "--evaluator", "paraphrase-mining", "--similarity", "dot"], 2,
                       ["cosine only"]),
        "threshold for binary": (["--pairs", one_class, "--evaluator", "binary", "--positive-threshold", "0.5"], 2,
                                 ["--positive-threshold"]),
        "repeated similarity": (["--pairs", one_class, "--evaluator", "binary", "--similarity", "dot", "dot"], 2,
                                ["twice"]),
    }


BAD_CASES = ["binary graded labels", "binary one class", "retrieval no positives", "mining no positives",
             "queries without id", "corpus without text", "qrels without corpus-id", "qrels unknown document",
             "qrels unknown query", "qrels all zero", "duplicate query id", "broken jsonl", "null text",
             "missing queries file", "ragged tsv", "unknown evaluator", "queries for binary", "queries alone",
             "pairs and queries", "retrieval without data", "retrieval two functions", "retrieval euclidean",
             "mining dot", "threshold for binary", "repeated similarity"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, rows):
    cases = _bad_inputs(tmp_path_factory.mktemp("evaluators_bad"), rows)
    assert sorted(cases) == sorted(BAD_CASES)
    return cases


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line(case, bad_inputs, capsys, model_path):
    argv, code, needles = bad_inputs[case]
    proc = _run(capsys, ["--model", model_path, *argv, "--json"])
    assert_user_error(proc, code, *needles)
    assert proc.stdout == ""
