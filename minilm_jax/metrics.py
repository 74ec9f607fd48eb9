"""Similarity of embedding pairs and their correlation with gold scores, computed as
sentence-transformers' EmbeddingSimilarityEvaluator computes them, under its key names
(`pearson_cosine`, `spearman_cosine`, ...)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from minilm_jax.errors import UserError

SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def pairwise_similarity(fn: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise similarity in float32, as sentence_transformers.util.pairwise_* compute it."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if fn == "cosine":
        return np.sum(_unit(a) * _unit(b), axis=-1)
    if fn == "dot":
        return np.sum(a * b, axis=-1)
    if fn == "euclidean":
        return -np.linalg.norm(a - b, axis=-1)
    if fn == "manhattan":
        return -np.sum(np.abs(a - b), axis=-1)
    raise UserError(f"unknown similarity function {fn!r}; use one of {', '.join(SIMILARITY_FNS)}")


MATRIX_SIMILARITY_FNS = ("cosine", "dot")


def similarity_matrix(fn: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] scores of every row of `a` against every row of `b` in float32, as
    sentence_transformers.util.cos_sim / dot_score compute them (cosine normalises both sides first)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if fn == "cosine":
        return _unit(a) @ _unit(b).T
    if fn == "dot":
        return a @ b.T
    raise UserError(f"unknown similarity function {fn!r} for a score matrix; use one of {', '.join(MATRIX_SIMILARITY_FNS)}")


def similarity_correlations(emb1: np.ndarray, emb2: np.ndarray, gold, fns=("cosine",)) -> dict[str, float]:
    """{'pearson_cosine': ..., 'spearman_cosine': ..., ...} for each similarity function."""
    gold = [float(s) for s in gold]
    if len(gold) < 2:
        raise UserError(f"correlations need at least 2 pairs, got {len(gold)}")
    if len(set(gold)) < 2:
        raise UserError("every gold score is the same, so correlations are undefined; use pairs with varied scores")
    out = {}
    for fn in fns:
        scores = pairwise_similarity(fn, emb1, emb2)
        out[f"pearson_{fn}"] = float(pearsonr(gold, scores)[0])
        out[f"spearman_{fn}"] = float(spearmanr(gold, scores)[0])
    return out


def evaluate_pairs(model, pairs, fns=("cosine",), batch_size: int = 32, dtype: str = "float32") -> dict[str, float]:
    """Embed both sides of every pair with `model` and correlate with the gold scores."""
    from minilm_jax.encode import encode

    emb1 = encode(pairs.sentence1, model, batch_size=batch_size, dtype=dtype)
    emb2 = encode(pairs.sentence2, model, batch_size=batch_size, dtype=dtype)
    return similarity_correlations(emb1, emb2, pairs.scores, fns)
