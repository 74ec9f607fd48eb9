"""The evaluators of sentence-transformers 6.2, computed from our embeddings on the host (numpy):
the same numbers under the same key names (without ST's `name_` prefix).

- `similarity` (EmbeddingSimilarityEvaluator): pearson_cosine, spearman_cosine; primary
  spearman_cosine.
- `binary` (BinaryClassificationEvaluator): cosine_accuracy, cosine_accuracy_threshold, cosine_f1,
  cosine_f1_threshold, cosine_precision, cosine_recall, cosine_ap, cosine_mcc; primary cosine_ap.
- `retrieval` (InformationRetrievalEvaluator): cosine_accuracy@k, cosine_precision@k,
  cosine_recall@k for k in 1, 3, 5, 10, cosine_ndcg@10, cosine_mrr@10, cosine_map@100; primary
  cosine_ndcg@10.
- `paraphrase-mining` (ParaphraseMiningEvaluator): average_precision, f1, precision, recall,
  threshold; primary average_precision.
(`cosine` stands for each similarity function asked for.)

The interface (evaluate.py and the training loop call only this):

    from minilm_jax.evaluators import build_evaluator, load_retrieval
    ev = build_evaluator("binary", pairs=pairs)              # pairs: minilm_jax.pairs.Pairs
    ev = build_evaluator("retrieval", retrieval=load_retrieval(queries, corpus, qrels))
    metrics = ev.evaluate(model, batch_size=32, dtype="float32")   # {"cosine_ap": 0.83, ...}, plain floats
    ev.primary_metric    # the key to select a model by, as ST's `primary_metric`: "cosine_ap"
    ev.name              # "binary" (the --evaluator name)
    ev.display_name      # "Binary Classification" (ST's `description`, for the model card)
    ev.st_class          # "BinaryClassificationEvaluator"
    ev.sizes()           # {"pairs": 5000}: what the data holds, for a log line
    ev.card_config()     # ST's get_config_dict(): the evaluator's settings shown in a model card
    ev.encode_calls()    # the texts of each encode call evaluate() makes (encode.warm_up compiles for them)

`build_evaluator` reads nothing and encodes nothing; it checks the data and the options (a
UserError, or a UsageError for options, names what is wrong), so a trainer can call it before it
creates its output folder. `model` is anything `minilm_jax.encode.encode` takes (a loaded `Model`, a folder, None). Every
text is embedded once (duplicates are looked up), and the metrics are pure functions of the
embeddings, which the tests give sentence-transformers too:
`binary_metrics`, `retrieval_metrics`, `paraphrase_mining_metrics` (and `similarity_correlations`
in metrics.py).

Data:
- `similarity`, `binary`: a pairs file. `binary` needs labels 0 or 1 (ST asserts so) and both
  classes present.
- `retrieval`: three files (`load_retrieval`), in BEIR's layout: queries and corpus with an id
  column (`_id` or `id`) and `text` (a corpus `title`, where present and not empty, is put before
  the text with a space, as ST's example for BEIR data does), and qrels with `query-id`,
  `corpus-id` and an optional `score` (rows with score <= 0 are not relevant). JSON Lines (.jsonl),
  .tsv (quoting disabled) or .csv. Or a pairs file (`retrieval_from_pairs`).
- `paraphrase-mining`: a pairs file (`mining_from_pairs`).

A pair is a positive (a duplicate) for `retrieval_from_pairs` and `mining_from_pairs` when its
score is >= `positive_threshold` (default 1.0: label 1 of a 0/1 file).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from minilm_jax.errors import UsageError, UserError
from minilm_jax.metrics import SIMILARITY_FNS, evaluate_pairs, pairwise_similarity, similarity_matrix
from minilm_jax.search import paraphrase_mining_embeddings

EVALUATORS = ("similarity", "binary", "retrieval", "paraphrase-mining")
RETRIEVAL_FNS = ("cosine", "dot")
# InformationRetrievalEvaluator's defaults.
MRR_AT_K = (10,)
NDCG_AT_K = (10,)
ACCURACY_AT_K = (1, 3, 5, 10)
PRECISION_RECALL_AT_K = (1, 3, 5, 10)
MAP_AT_K = (100,)
# ParaphraseMiningEvaluator's defaults.
MINING_TOP_K = 100
MINING_MAX_PAIRS = 500_000
_SCORE_BLOCK = 1 << 24  # score-matrix entries computed at a time (64 MB of float32)


def _embed_unique(model, texts: Sequence[str], batch_size: int, dtype: str) -> tuple[np.ndarray, dict[str, int]]:
    """Embeddings of the distinct texts (first-appearance order) and text -> row."""
    from minilm_jax.encode import encode

    unique = _unique(texts)
    return encode(unique, model, batch_size=batch_size, dtype=dtype), {t: i for i, t in enumerate(unique)}


def _unique(texts: Sequence[str]) -> list[str]:
    """The distinct texts, in first-appearance order."""
    return list(dict.fromkeys(texts))


def _row_name(source: str, i: int) -> str:
    """Where row i (0-based) of a pairs file is, as pairs.py numbers lines (a header is line 1)."""
    ext = os.path.splitext(source)[1].lower()
    if ext in (".tsv", ".tab", ".csv"):
        return f"{source} line {i + 2}"
    if ext in (".jsonl", ".json"):
        return f"{source} line {i + 1}"
    return f"{source} row {i}"


# ----------------------------------------------------------------------------- similarity

@dataclasses.dataclass(frozen=True, eq=False)
class SimilarityEvaluator:
    """EmbeddingSimilarityEvaluator: metrics.evaluate_pairs, unchanged. With several similarity
    functions ST adds pearson_max/spearman_max and selects by spearman_max; evaluate_pairs does not add
    them, so the primary metric is then the first function's spearman."""

    pairs: object  # minilm_jax.pairs.Pairs
    similarity_fns: tuple[str, ...] = ("cosine",)
    name = "similarity"
    display_name = "Semantic Similarity"
    st_class = "EmbeddingSimilarityEvaluator"

    @property
    def primary_metric(self) -> str:
        return f"spearman_{self.similarity_fns[0]}"

    def sizes(self) -> dict[str, int]:
        return {"pairs": len(self.pairs)}

    def card_config(self) -> dict:
        return {}

    def evaluate(self, model, batch_size: int = 32, dtype: str = "float32") -> dict[str, float]:
        return evaluate_pairs(model, self.pairs, self.similarity_fns, batch_size, dtype)

    def encode_calls(self) -> list[list[str]]:
        """The texts of each encode call `evaluate` makes (for encode.warm_up)."""
        return [list(self.pairs.sentence1), list(self.pairs.sentence2)]


# ----------------------------------------------------------------------------- binary

_BINARY_KEYS = ("accuracy", "accuracy_threshold", "f1", "f1_threshold", "precision", "recall", "ap", "mcc")


def _sorted_by_score(scores: np.ndarray, labels: np.ndarray, greater_is_better: bool):
    """Scores and labels from most to least similar, and the index of the last row of each run of
    equal scores (ST walks the rows and skips to the end of such a run before it decides)."""
    order = np.argsort(-scores if greater_is_better else scores, kind="stable")
    s, y = scores[order], labels[order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    return s, y, ends


def _cut(s: np.ndarray, e: int) -> np.float32:
    """ST's threshold after sorted row e: the midpoint to the next score, or the score itself where
    that is the last row or where the rounded midpoint equals the next score."""
    if e == len(s) - 1:
        return s[e]
    threshold = (s[e] + s[e + 1]) / 2  # float32, as ST's numpy scalars
    return s[e] if threshold == s[e + 1] else threshold


def best_accuracy(scores: np.ndarray, labels: np.ndarray, greater_is_better: bool) -> tuple[float, float]:
    """BinaryClassificationEvaluator.find_best_acc_and_threshold: (accuracy, threshold)."""
    s, y, ends = _sorted_by_score(scores, labels, greater_is_better)
    n = len(y)
    positives = np.cumsum(y == 1)
    negatives_left = np.sum(y == 0) - np.cumsum(y == 0)
    accuracy = (positives[ends] + negatives_left[ends]) / n
    all_dissimilar = np.sum(y == 0) / n  # the threshold that predicts every pair as dissimilar
    best = int(np.argmax(accuracy))
    if accuracy[best] > all_dissimilar:
        return float(accuracy[best]), float(_cut(s, ends[best]))
    return float(all_dissimilar), float(np.nextafter(s[0], np.inf if greater_is_better else -np.inf,
                                                     dtype=np.result_type(s.dtype, np.float16)))


def best_f1(scores: np.ndarray, labels: np.ndarray, greater_is_better: bool) -> tuple[float, float, float, float]:
    """BinaryClassificationEvaluator.find_best_f1_and_threshold: (f1, precision, recall, threshold)."""
    s, y, ends = _sorted_by_score(scores, labels, greater_is_better)
    correct = np.cumsum(y == 1)[ends]
    ends = ends[correct > 0]
    correct = correct[correct > 0]
    if not len(ends):
        return 0.0, 0.0, 0.0, 0.0
    precision = correct / (ends + 1)
    recall = correct / np.sum(labels)
    f1 = 2 * precision * recall / (precision + recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(precision[best]), float(recall[best]), float(_cut(s, ends[best]))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score for 0/1 labels, step by step as sklearn 1.x computes it
    (so that the float sums are the same)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    ends = np.append(np.flatnonzero(np.diff(s)), len(s) - 1)
    tps = np.cumsum(y, dtype=np.float64)[ends]
    fps = 1 + ends.astype(np.float64) - tps
    ps = tps + fps
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(ps != 0, np.divide(tps, ps), 0.0)
    recall = tps / tps[-1]
    precision = np.concatenate((np.flip(precision), [1.0]))
    recall = np.concatenate((np.flip(recall), [0.0]))
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def matthews_corrcoef(labels: np.ndarray, predicted: np.ndarray) -> float:
    """sklearn.metrics.matthews_corrcoef for 0/1 labels and predictions (both labels present in `labels`)."""
    labels, predicted = labels.astype(bool), predicted.astype(bool)
    confusion = np.array([[np.sum(~labels & ~predicted), np.sum(~labels & predicted)],
                          [np.sum(labels & ~predicted), np.sum(labels & predicted)]])
    t_sum = confusion.sum(axis=1, dtype=np.float64)
    p_sum = confusion.sum(axis=0, dtype=np.float64)
    n_correct = np.trace(confusion, dtype=np.float64)
    n_samples = p_sum.sum()
    cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
    cov_ypyp = n_samples ** 2 - np.dot(p_sum, p_sum)
    cov_ytyt = n_samples ** 2 - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ypyp * cov_ytyt))


def binary_metrics(emb1: np.ndarray, emb2: np.ndarray, labels, fns: Sequence[str] = ("cosine",)) -> dict[str, float]:
    """BinaryClassificationEvaluator's metrics of embedding pairs with 0/1 labels: for each function
    `{fn}_accuracy`, `{fn}_accuracy_threshold`, `{fn}_f1`, `{fn}_f1_threshold`, `{fn}_precision`,
    `{fn}_recall`, `{fn}_ap`, `{fn}_mcc`; with several functions also `max_{metric}` of each (as ST).
    Euclidean and manhattan thresholds are distances (smaller is more similar), as ST reports them."""
    labels = np.asarray(labels)
    per_fn = {}
    for fn in fns:
        similarity = pairwise_similarity(fn, emb1, emb2)
        greater_is_better = fn in ("cosine", "dot")
        scores = similarity if greater_is_better else -similarity  # ST scores distances
        accuracy, accuracy_threshold = best_accuracy(scores, labels, greater_is_better)
        f1, precision, recall, f1_threshold = best_f1(scores, labels, greater_is_better)
        ap = average_precision(labels, scores if greater_is_better else -scores)
        predicted = scores >= np.float32(f1_threshold) if greater_is_better else scores <= np.float32(f1_threshold)
        per_fn[fn] = {"accuracy": accuracy, "accuracy_threshold": accuracy_threshold, "f1": f1,
                      "f1_threshold": f1_threshold, "precision": precision, "recall": recall, "ap": ap,
                      "mcc": matthews_corrcoef(labels, predicted)}
    out = {f"{fn}_{key}": float(value) for fn, values in per_fn.items() for key, value in values.items()}
    if len(fns) > 1:
        out.update({f"max_{key}": float(max(values[key] for values in per_fn.values())) for key in _BINARY_KEYS})
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class BinaryEvaluator:
    """BinaryClassificationEvaluator over the pairs of a file with 0/1 labels."""

    sentence1: tuple[str, ...]
    sentence2: tuple[str, ...]
    labels: np.ndarray  # int64, 0 or 1
    similarity_fns: tuple[str, ...] = ("cosine",)
    name = "binary"
    display_name = "Binary Classification"
    st_class = "BinaryClassificationEvaluator"

    @classmethod
    def from_pairs(cls, pairs, similarity_fns=("cosine",)) -> "BinaryEvaluator":
        scores = np.asarray(pairs.scores)
        bad = np.flatnonzero((scores != 0) & (scores != 1))
        if len(bad):
            raise UserError(f"{_row_name(pairs.source, int(bad[0]))}: label {scores[bad[0]]:g} is not 0 or 1 "
                            f"({len(bad)} such rows); the binary evaluator needs 0 (different) / 1 (duplicate) "
                            "labels; use --evaluator similarity for graded scores")
        if len(np.unique(scores)) < 2:
            raise UserError(f"{pairs.source}: every label is {scores[0]:g}; the binary evaluator needs both "
                            "labels, 0 and 1")
        return cls(tuple(pairs.sentence1), tuple(pairs.sentence2), scores.astype(np.int64), tuple(similarity_fns))

    @property
    def primary_metric(self) -> str:
        return "max_ap" if len(self.similarity_fns) > 1 else f"{self.similarity_fns[0]}_ap"

    def sizes(self) -> dict[str, int]:
        return {"pairs": len(self.labels)}

    def card_config(self) -> dict:
        return {}

    def encode_calls(self) -> list[list[str]]:
        """The texts of each encode call `evaluate` makes (for encode.warm_up)."""
        return [_unique(self.sentence1 + self.sentence2)]

    def evaluate(self, model, batch_size: int = 32, dtype: str = "float32") -> dict[str, float]:
        emb, row = _embed_unique(model, self.sentence1 + self.sentence2, batch_size, dtype)
        emb1 = emb[[row[t] for t in self.sentence1]]
        emb2 = emb[[row[t] for t in self.sentence2]]
        return binary_metrics(emb1, emb2, self.labels, self.similarity_fns)


# ----------------------------------------------------------------------------- retrieval

@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalData:
    """Queries, corpus and relevance judgements, as InformationRetrievalEvaluator takes them. Only
    queries with at least one relevant document are kept (ST drops the others); every relevant id is
    a corpus id."""

    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    corpus_ids: tuple[str, ...]
    corpus: tuple[str, ...]
    relevant: Mapping[str, frozenset]  # query id -> corpus ids
    source: str = ""


def _top_hits(scores: np.ndarray, ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Each row's k best (id, score), ordered by (-score, column): with the columns in corpus-id
    order, that is the order ST ranks in, and the one it breaks ties at the k-th place by."""
    k = min(k, scores.shape[1])
    neg = -scores
    if k < scores.shape[1]:
        kth = np.partition(neg, k - 1, axis=1)[:, k - 1]
    else:
        kth = neg.max(axis=1)
    out = []
    for row, bound in zip(neg, kth):
        candidates = np.flatnonzero(row <= bound)  # every score at or above the k-th, ties included
        best = candidates[np.lexsort((candidates, row[candidates]))][:k]
        out.append([(ids[c], s) for c, s in zip(best.tolist(), (-row[best]).tolist())])
    return out


def _dcg_at_k(relevances, k):
    dcg = 0
    for i in range(min(len(relevances), k)):
        dcg += relevances[i] / np.log2(i + 2)
    return dcg


def _ranking_metrics(hits: list[list[tuple[str, float]]], query_ids, relevant) -> dict[str, dict[int, float]]:
    """InformationRetrievalEvaluator.compute_metrics, operation for operation (so the float sums agree)."""
    num_hits_at_k = {k: 0 for k in ACCURACY_AT_K}
    precisions_at_k = {k: [] for k in PRECISION_RECALL_AT_K}
    recall_at_k = {k: [] for k in PRECISION_RECALL_AT_K}
    mrr = {k: 0 for k in MRR_AT_K}
    ndcg = {k: [] for k in NDCG_AT_K}
    ave_p = {k: [] for k in MAP_AT_K}
    for query_id, top_hits in zip(query_ids, hits):
        rel = relevant[query_id]
        for k in ACCURACY_AT_K:
            if any(cid in rel for cid, _ in top_hits[:k]):
                num_hits_at_k[k] += 1
        for k in PRECISION_RECALL_AT_K:
            correct = sum(1 for cid, _ in top_hits[:k] if cid in rel)
            precisions_at_k[k].append(correct / k)
            recall_at_k[k].append(correct / len(rel))
        for k in MRR_AT_K:
            for rank, (cid, _) in enumerate(top_hits[:k]):
                if cid in rel:
                    mrr[k] += 1.0 / (rank + 1)
                    break
        for k in NDCG_AT_K:
            predicted = [1 if cid in rel else 0 for cid, _ in top_hits[:k]]
            ndcg[k].append(_dcg_at_k(predicted, k) / _dcg_at_k([1] * len(rel), k))
        for k in MAP_AT_K:
            correct = 0
            sum_precisions = 0
            for rank, (cid, _) in enumerate(top_hits[:k]):
                if cid in rel:
                    correct += 1
                    sum_precisions += correct / (rank + 1)
            ave_p[k].append(sum_precisions / min(k, len(rel)))
    n = len(query_ids)
    return {"accuracy@k": {k: v / n for k, v in num_hits_at_k.items()},
            "precision@k": {k: np.mean(v) for k, v in precisions_at_k.items()},
            "recall@k": {k: np.mean(v) for k, v in recall_at_k.items()},
            "ndcg@k": {k: np.mean(v) for k, v in ndcg.items()},
            "mrr@k": {k: v / n for k, v in mrr.items()},
            "map@k": {k: np.mean(v) for k, v in ave_p.items()}}


def retrieval_metrics(query_emb: np.ndarray, corpus_emb: np.ndarray, data: RetrievalData,
                      fn: str = "cosine", precision: str = "float32") -> dict[str, float]:
    """InformationRetrievalEvaluator's metrics with ST's default k lists, keys `{fn}_accuracy@1`,
    ..., `{fn}_ndcg@10`, `{fn}_mrr@10`, `{fn}_map@100`. Rows of `query_emb` are `data.query_ids`,
    rows of `corpus_emb` are `data.corpus_ids`.

    `precision` other than float32: the corpus quantized to it (int8/uint8 ranges from the corpus
    embeddings, quantize_embeddings' default), the float queries searched against it as
    minilm_jax.search does (quantized corpora: first stage and float rescoring, multiplier 2)."""
    max_k = max(*MRR_AT_K, *NDCG_AT_K, *ACCURACY_AT_K, *PRECISION_RECALL_AT_K, *MAP_AT_K)
    by_id = sorted(range(len(data.corpus_ids)), key=data.corpus_ids.__getitem__)  # ST's tie-break order
    corpus_emb = np.asarray(corpus_emb)[by_id]
    ids = [data.corpus_ids[c] for c in by_id]
    if precision != "float32":
        hits = _quantized_hits(np.asarray(query_emb), corpus_emb, ids, max_k, fn, precision)
    else:
        step = max(1, _SCORE_BLOCK // max(1, len(ids)))
        hits = []
        for start in range(0, len(data.query_ids), step):
            hits.extend(_top_hits(similarity_matrix(fn, query_emb[start:start + step], corpus_emb), ids, max_k))
    metrics = _ranking_metrics(hits, data.query_ids, data.relevant)
    return {f"{fn}_{name.replace('@k', '@' + str(k))}": float(value)
            for name, values in metrics.items() for k, value in values.items()}


def _quantized_hits(query_emb, corpus_emb, ids, k: int, fn: str, precision: str) -> list[list[tuple[str, float]]]:
    from minilm_jax.quantize import CALIBRATED, quantize, ranges_of
    from minilm_jax.search import place_corpus, search

    ranges = ranges_of(corpus_emb) if precision in CALIBRATED else None
    corpus = place_corpus(quantize(corpus_emb, precision, ranges), precision, ranges=ranges, dim=corpus_emb.shape[1])
    scores, rows = search(query_emb, corpus, k, fn)
    return [[(ids[c], s) for c, s in zip(r, sc)] for r, sc in zip(rows.tolist(), scores.tolist())]


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalEvaluator:
    """InformationRetrievalEvaluator with one score function (ST's default: the model's, cosine), the
    corpus at `precision` (retrieval_metrics)."""

    data: RetrievalData
    similarity_fn: str = "cosine"
    precision: str = "float32"
    name = "retrieval"
    display_name = "Information Retrieval"
    st_class = "InformationRetrievalEvaluator"

    @property
    def primary_metric(self) -> str:
        return f"{self.similarity_fn}_ndcg@{max(NDCG_AT_K)}"

    def sizes(self) -> dict[str, int]:
        return {"queries": len(self.data.query_ids), "corpus": len(self.data.corpus_ids)}

    def card_config(self) -> dict:
        return {}

    def encode_calls(self) -> list[list[str]]:
        """The texts of each encode call `evaluate` makes (for encode.warm_up)."""
        return [_unique(self.data.queries + self.data.corpus)]

    def evaluate(self, model, batch_size: int = 32, dtype: str = "float32") -> dict[str, float]:
        emb, row = _embed_unique(model, self.data.queries + self.data.corpus, batch_size, dtype)
        return retrieval_metrics(emb[[row[t] for t in self.data.queries]], emb[[row[t] for t in self.data.corpus]],
                                 self.data, self.similarity_fn, self.precision)


def _ids(n: int, prefix: str = "") -> list[str]:
    """Zero-padded ids, so that their string order (ST's tie-break) is their order."""
    width = len(str(max(n - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def retrieval_from_pairs(pairs, positive_threshold: float = 1.0) -> RetrievalData:
    """A retrieval task from pairs with positives: the corpus is every distinct sentence2 text (of all
    pairs, positive or not; ids "0", "1", ... zero-padded in first-appearance order); the queries are
    the distinct sentence1 texts of the positive pairs (score >= positive_threshold; ids "q0", ...),
    each relevant to the sentence2 of each of its positive pairs. Identical texts are one query or one
    document. A query whose own text is also a corpus document keeps it as an ordinary document."""
    corpus = list(dict.fromkeys(pairs.sentence2))
    corpus_id = dict(zip(corpus, _ids(len(corpus))))
    relevant: dict[str, set] = {}
    for a, b, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores):
        if score >= positive_threshold:
            relevant.setdefault(a, set()).add(corpus_id[b])
    if not relevant:
        raise UserError(f"{pairs.source} has no pair with score >= {positive_threshold:g}, so there is no query "
                        "with a relevant document; lower --positive-threshold or use another file")
    queries = list(relevant)
    query_ids = _ids(len(queries), "q")
    return RetrievalData(tuple(query_ids), tuple(queries), tuple(corpus_id.values()), tuple(corpus),
                         {q: frozenset(relevant[t]) for q, t in zip(query_ids, queries)}, pairs.source)


# ----------------------------------------------------------------------------- retrieval files

def _records(path: str, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(line number, row)]) of a JSON Lines, TSV or CSV file."""
    if not os.path.exists(path):
        raise UserError(f"{what} file {path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give the {what} file (.jsonl, .tsv or .csv)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".tsv", ".csv"):
        raise UserError(f"{path}: unknown file type {ext or '(none)'} for the {what} file; use .jsonl, .tsv or .csv")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext in (".jsonl", ".json"):
                rows = []
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {number} is not valid JSON ({e.msg}); "
                                        "write one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; "
                                        "write one JSON object per line")
                    rows.append((number, row))
                columns = list(dict.fromkeys(k for _, row in rows for k in row))
            else:
                reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if ext == ".tsv"
                          else csv.reader(f))
                columns = [c.strip() for c in next(reader, [])]
                rows = []
                for fields in reader:
                    number = reader.line_num
                    if not any(field.strip() for field in fields):
                        continue
                    if len(fields) != len(columns):
                        raise UserError(f"{path} line {number} has {len(fields)} fields, the header "
                                        f"{len(columns)}; fix the row (TSV is read with quoting disabled)")
                    rows.append((number, dict(zip(columns, fields))))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    if not rows:
        raise UserError(f"{what} file {path} has no rows; add at least one")
    return columns, rows


def _column(path: str, columns: list[str], names: Sequence[str], what: str, needs: str) -> str:
    for name in names:
        if name in columns:
            return name
    raise UserError(f"{path} has no column {' or '.join(map(repr, names))} (found {', '.join(map(repr, columns))}); "
                    f"the {what} file needs {needs}")


def _id_value(value, path: str, number: int, column: str) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{path} line {number}: {column} is {value!r:.40}, not a non-empty string or integer id; fix the row")


def _read_texts(path: str, what: str) -> dict[str, str]:
    columns, rows = _records(path, what)
    needs = "columns `_id` (or `id`) and `text`"
    id_col = _column(path, columns, ("_id", "id"), what, needs)
    text_col = _column(path, columns, ("text",), what, needs)
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, row in rows:
        key = _id_value(row.get(id_col), path, number, id_col)
        text = row.get(text_col)
        if not isinstance(text, str):
            raise UserError(f"{path} line {number}: text is {type(text).__name__} {text!r:.40}, not a string; fix the row")
        title = row.get("title")
        if isinstance(title, str) and title.strip():
            text = (title + " " + text).strip()
        if key in out:
            raise UserError(f"{path} line {number}: id {key!r} again (first on line {first_line[key]}); "
                            f"ids must be unique in the {what} file")
        out[key] = text
        first_line[key] = number
    return out


def load_retrieval(queries_path: str, corpus_path: str, qrels_path: str) -> RetrievalData:
    """Queries, corpus and qrels files (BEIR's layout; see the module docstring) -> RetrievalData."""
    queries = _read_texts(queries_path, "queries")
    corpus = _read_texts(corpus_path, "corpus")
    columns, rows = _records(qrels_path, "qrels")
    needs = "columns `query-id` and `corpus-id` (and optionally `score`)"
    q_col = _column(qrels_path, columns, ("query-id",), "qrels", needs)
    c_col = _column(qrels_path, columns, ("corpus-id",), "qrels", needs)
    relevant: dict[str, set] = {}
    for number, row in rows:
        qid = _id_value(row.get(q_col), qrels_path, number, q_col)
        cid = _id_value(row.get(c_col), qrels_path, number, c_col)
        if qid not in queries:
            raise UserError(f"{qrels_path} line {number}: query-id {qid!r} is not in {queries_path}; "
                            "fix the id or add the query")
        if cid not in corpus:
            raise UserError(f"{qrels_path} line {number}: corpus-id {cid!r} is not in {corpus_path}; "
                            "fix the id or add the document")
        if "score" in columns:
            raw = row.get("score")
            try:
                score = float(raw)
            except (TypeError, ValueError):
                raise UserError(f"{qrels_path} line {number}: score {raw!r:.40} is not a number; fix the row") from None
            if not math.isfinite(score):
                raise UserError(f"{qrels_path} line {number}: score {raw!r} is not finite; fix the row")
            if score <= 0:
                continue  # judged not relevant
        relevant.setdefault(qid, set()).add(cid)
    query_ids = [q for q in queries if q in relevant]
    if not query_ids:
        raise UserError(f"{qrels_path} marks no document relevant (every score <= 0); "
                        "a retrieval evaluation needs queries with relevant documents")
    return RetrievalData(tuple(query_ids), tuple(queries[q] for q in query_ids), tuple(corpus),
                         tuple(corpus.values()), {q: frozenset(relevant[q]) for q in query_ids},
                         f"{queries_path}, {corpus_path}, {qrels_path}")


# ----------------------------------------------------------------------------- paraphrase mining

@dataclasses.dataclass(frozen=True, eq=False)
class MiningData:
    """ParaphraseMiningEvaluator's sentences_map (ids -> sentences) and duplicates_list (id pairs)."""

    ids: tuple[str, ...]
    sentences: tuple[str, ...]
    duplicates: tuple[tuple[str, str], ...]
    source: str = ""


def mining_from_pairs(pairs, positive_threshold: float = 1.0) -> MiningData:
    """The distinct texts of both columns (ids "0", "1", ... zero-padded, in first-appearance order,
    row by row) and, as duplicates, the positive pairs (score >= positive_threshold). A positive pair
    of two identical texts is left out: mining never pairs a sentence with itself, so ST would count
    it as a duplicate that no model can find."""
    sentences = list(dict.fromkeys(t for pair in zip(pairs.sentence1, pairs.sentence2) for t in pair))
    ids = _ids(len(sentences))
    sid = dict(zip(sentences, ids))
    duplicates = {tuple(sorted((sid[a], sid[b]))) for a, b, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores)
                  if score >= positive_threshold and a != b}
    if not duplicates:
        raise UserError(f"{pairs.source} has no pair of two different texts with score >= {positive_threshold:g}; "
                        "paraphrase mining needs duplicates; lower --positive-threshold or use another file")
    return MiningData(tuple(ids), tuple(sentences), tuple(sorted(duplicates)), pairs.source)


def paraphrase_mining_metrics(emb: np.ndarray, data: MiningData, top_k: int = MINING_TOP_K,
                              max_pairs: int = MINING_MAX_PAIRS) -> dict[str, float]:
    """ParaphraseMiningEvaluator's metrics (no transitive closure, its default): average_precision,
    f1, precision, recall, threshold. Rows of `emb` are `data.ids`."""
    row = {key: i for i, key in enumerate(data.ids)}
    gold = {tuple(sorted((row[a], row[b]))) for a, b in data.duplicates if a != b}
    total = len({tuple(sorted(pair)) for pair in data.duplicates})  # ST's total_num_duplicates
    ranked = paraphrase_mining_embeddings(emb, max_pairs=max_pairs, top_k=top_k)
    n_extract = n_correct = previous_correct = 0
    threshold = 0
    best_f1 = best_recall = best_precision = 0
    ap = 0
    for idx, (score, i, j) in enumerate(ranked):
        n_extract += 1
        if (i, j) in gold:
            n_correct += 1
        if idx + 1 < len(ranked) and ranked[idx + 1][0] == score:
            continue
        if n_correct > previous_correct:
            precision = n_correct / n_extract
            recall = n_correct / total if total > 0 else 0.0
            f1 = 2 * precision * recall / (precision + recall)
            ap += precision * (n_correct - previous_correct)
            if f1 > best_f1:
                best_f1, best_precision, best_recall = f1, precision, recall
                threshold = (ranked[idx][0] + ranked[min(idx + 1, len(ranked) - 1)][0]) / 2
        previous_correct = n_correct
    ap = ap / total if total > 0 else 0
    return {"average_precision": float(ap), "f1": float(best_f1), "precision": float(best_precision),
            "recall": float(best_recall), "threshold": float(threshold)}


@dataclasses.dataclass(frozen=True, eq=False)
class ParaphraseMiningEvaluator:
    """ParaphraseMiningEvaluator with ST's defaults (cosine, top_k 100, max_pairs 500,000, no transitive closure)."""

    data: MiningData
    top_k: int = MINING_TOP_K
    max_pairs: int = MINING_MAX_PAIRS
    name = "paraphrase-mining"
    display_name = "Paraphrase Mining"
    st_class = "ParaphraseMiningEvaluator"
    primary_metric = "average_precision"

    def sizes(self) -> dict[str, int]:
        return {"sentences": len(self.data.ids), "duplicates": len(self.data.duplicates)}

    def card_config(self) -> dict:
        return {"add_transitive_closure": False, "max_pairs": self.max_pairs, "top_k": self.top_k}

    def encode_calls(self) -> list[list[str]]:
        """The texts of each encode call `evaluate` makes (for encode.warm_up)."""
        return [_unique(self.data.sentences)]

    def evaluate(self, model, batch_size: int = 32, dtype: str = "float32") -> dict[str, float]:
        emb, row = _embed_unique(model, self.data.sentences, batch_size, dtype)
        return paraphrase_mining_metrics(emb[[row[t] for t in self.data.sentences]], self.data, self.top_k,
                                         self.max_pairs)


# ----------------------------------------------------------------------------- building one

def build_evaluator(name: str, *, pairs=None, retrieval: RetrievalData | None = None,
                    similarity_fns: Sequence[str] | None = None, positive_threshold: float = 1.0,
                    model_similarity: str = "cosine", precision: str = "float32"):
    """The evaluator `name` (one of EVALUATORS) over `pairs` (a minilm_jax.pairs.Pairs) or, for
    `retrieval`, over `retrieval` (load_retrieval) or pairs (retrieval_from_pairs).

    similarity_fns: default (model_similarity,), the model's similarity_fn_name, as sentence-transformers'
    evaluators default to it (paraphrase mining: cosine). `similarity` and `binary` take
    any of cosine, dot, euclidean, manhattan; `retrieval` one of cosine, dot; `paraphrase-mining`
    only cosine (ST mines with cosine). positive_threshold: the score from which a pair counts as a
    positive, for `retrieval` from pairs and for `paraphrase-mining`. precision: `retrieval`'s corpus
    precision (retrieval_metrics)."""
    if name not in EVALUATORS:
        raise UsageError(f"unknown evaluator {name!r}; use one of {', '.join(EVALUATORS)}")
    default = "cosine" if name == "paraphrase-mining" else model_similarity
    fns = tuple(similarity_fns or (default,))
    unknown = [fn for fn in fns if fn not in SIMILARITY_FNS]
    if unknown:
        raise UsageError(f"unknown similarity function {unknown[0]!r}; use {', '.join(SIMILARITY_FNS)}")
    if len(set(fns)) != len(fns):
        raise UsageError(f"--similarity names a function twice ({' '.join(fns)}); name each once")
    if retrieval is not None and name != "retrieval":
        raise UsageError(f"queries/corpus/qrels files are for --evaluator retrieval, not {name}")
    if name == "retrieval":
        if len(fns) != 1 or fns[0] not in RETRIEVAL_FNS:
            given = " ".join(fns) if similarity_fns else f"the model's similarity_fn_name {fns[0]}"
            raise UsageError(f"--evaluator retrieval scores with one function, cosine or dot (got {given}); "
                             "pass --similarity cosine or --similarity dot")
        if retrieval is None:
            if pairs is None:
                raise UsageError("--evaluator retrieval needs --queries/--corpus/--qrels or --pairs")
            retrieval = retrieval_from_pairs(pairs, positive_threshold)
        elif pairs is not None:
            raise UsageError("give --evaluator retrieval either --pairs or --queries/--corpus/--qrels, not both")
        return RetrievalEvaluator(retrieval, fns[0], precision)
    if precision != "float32":
        raise UsageError(f"--precision is for --evaluator retrieval (the corpus's precision), not {name}")
    if pairs is None:
        raise UsageError(f"--evaluator {name} needs --pairs")
    if name == "similarity":
        return SimilarityEvaluator(pairs, fns)
    if name == "binary":
        return BinaryEvaluator.from_pairs(pairs, fns)
    if fns != ("cosine",):
        raise UsageError(f"--evaluator paraphrase-mining mines with cosine only, as sentence-transformers does "
                         f"(got --similarity {' '.join(fns)})")
    return ParaphraseMiningEvaluator(mining_from_pairs(pairs, positive_threshold))
