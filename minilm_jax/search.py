"""Exact top-k search on the devices: `semantic_search`, quantized corpora with rescoring, and
`paraphrase_mining`, with sentence-transformers' results.

The corpus is placed on the devices once (`place_corpus`), in chunks of `chunk_rows` rows, each
chunk's rows split over the devices and kept at its stored precision (float16, int8 and packed bits
take 1/2, 1/4 and 1/32 of float32's memory). A search runs one compiled program per (query chunk,
corpus chunk): scores of the query chunk against the chunk, the chunk's top k, merged into the
running top k. So device memory holds the corpus plus one [query_chunk, chunk_rows] score matrix, and
a search compiles at most 2 programs (the last query chunk is padded to the same shape).

Order: scores descending, ties by the lower corpus id, which is the order `lax.top_k` (XLA's TopK
keeps the lower index first among equals) gives and the merge keeps (the running top k, lower ids,
comes first). sentence-transformers returns the same hits; among exactly equal scores its order is
whatever torch.topk's partial sort and its heap leave (not specified by torch), so only ties can
be ordered differently. The first stage of a quantized search follows exact faiss instead: the higher
id first among equal inner products (int8/uint8), the lower among equal Hamming distances.

Quantized corpora (as sentence-transformers' semantic_search_faiss/usearch): the float query is
quantized like the corpus, the first stage ranks by the inner product of the quantized values
(int8/uint8) or by the Hamming distance (binary/ubinary, score = -distance), keeps
top_k * rescore_multiplier candidates, and rescoring scores them again with the float query against
the dequantized rows (float64, numpy's einsum and argsort as theirs) and keeps top_k.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Sequence

import numpy as np

from minilm_jax.errors import UserError
from minilm_jax.quantize import CALIBRATED, PACKED, check_precision, dequantize, quantize, stored_width

SCORE_FUNCTIONS = ("cosine", "dot")
DEFAULT_CHUNK_ROWS = 131072
DEFAULT_QUERY_CHUNK = 256
_SYNC_EVERY = 8  # device calls in flight at most (multi-device collectives hang with too many; JAX-FACTS 2)


def _score_function(fn) -> str:
    if callable(fn):  # sentence_transformers.util.cos_sim / dot_score
        fn = {"cos_sim": "cosine", "dot_score": "dot"}.get(getattr(fn, "__name__", ""), fn)
    if fn not in SCORE_FUNCTIONS:
        raise UserError(f"score_function must be one of {', '.join(SCORE_FUNCTIONS)} (or util.cos_sim / util.dot_score), "
                        f"got {fn!r}")
    return fn


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceCorpus:
    """A corpus on the devices (see the module docstring) and, for rescoring, its stored rows on the host."""

    chunks: tuple  # jax.Arrays [chunk_rows, width], the stored dtype, rows split over the devices
    rows: int
    dim: int
    precision: str
    chunk_rows: int
    host: tuple  # host arrays of stored rows (numpy or memory-mapped shards), in row order
    ranges: np.ndarray | None = None  # int8/uint8: the calibration ranges

    @property
    def device_bytes(self) -> int:
        return sum(c.size * c.dtype.itemsize for c in self.chunks)

    def host_rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored rows `ids` (any shape) from the host arrays."""
        starts = np.cumsum([0] + [len(h) for h in self.host])
        flat = ids.reshape(-1)
        out = np.empty((len(flat), self.host[0].shape[1]), self.host[0].dtype)
        which = np.searchsorted(starts, flat, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.host[s][flat[sel] - starts[s]]
        return out.reshape(*ids.shape, -1)


def _placement(devices):
    from minilm_jax.encode import _Placement, resolve_devices

    return _Placement(resolve_devices(devices))


def place_corpus(corpus, precision: str = "float32", chunk_rows: int = DEFAULT_CHUNK_ROWS, devices=None,
                 ranges: np.ndarray | None = None, dim: int | None = None) -> DeviceCorpus:
    """Put a corpus on the devices: a [N, W] array at `precision`, a sequence of such arrays (shards),
    or a `corpus.Corpus` (an embedded folder; its precision, dim and ranges are used).

    Host memory holds one chunk at a time beyond the given arrays. `dim` is the embedding dimension
    (default: W, or 8 W for the packed bit precisions)."""
    import jax

    from minilm_jax.corpus import Corpus

    if isinstance(corpus, Corpus):
        precision, dim, ranges = corpus.precision, corpus.dim, corpus.ranges()
        parts = list(corpus.shards())
    else:
        parts = [corpus] if (hasattr(corpus, "ndim") or not isinstance(corpus, (list, tuple))) else list(corpus)
        parts = [_as_numpy(p) for p in parts]
    check_precision(precision)
    parts = [p for p in parts if len(p)] or parts[:1]
    if not parts or any(p.ndim != 2 for p in parts):
        raise UserError(f"the corpus must be a [N, D] array (or a list of them), got shapes {[p.shape for p in parts]}")
    width = parts[0].shape[1]
    if dim is None:
        dim = width * 8 if precision in PACKED else width
    expected = np.dtype({"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
                         "binary": np.int8, "ubinary": np.uint8}[precision])
    for p in parts:
        if p.shape[1] != stored_width(precision, dim) or (p.dtype != expected and not (
                precision == "float32" and p.dtype.kind == "f")):
            raise UserError(f"a {precision} corpus of dimension {dim} has {expected} rows of width "
                            f"{stored_width(precision, dim)}, got {p.dtype} {p.shape}")
    if precision in CALIBRATED and ranges is None:
        raise UserError(f"an {precision} corpus needs its calibration ranges ([2, {dim}]) to rescore; pass ranges=")
    rows = sum(len(p) for p in parts)
    if rows == 0:
        raise UserError("the corpus is empty; there is nothing to search")
    placement = _placement(devices)
    n_dev = len(placement.devices)
    chunk_rows = max(n_dev, -(-min(int(chunk_rows), rows) // n_dev) * n_dev)
    chunks, buffer, filled = [], np.zeros((chunk_rows, width), expected), 0
    for part in parts:
        at = 0
        while at < len(part):
            take = min(chunk_rows - filled, len(part) - at)
            buffer[filled:filled + take] = part[at:at + take]
            filled += take
            at += take
            if filled == chunk_rows:
                chunks.append(jax.device_put(buffer, placement.rows))
                buffer, filled = np.zeros((chunk_rows, width), expected), 0
    if filled:
        chunks.append(jax.device_put(buffer, placement.rows))
    host = tuple(p if p.dtype == expected else p.astype(expected) for p in parts)
    return DeviceCorpus(tuple(chunks), rows, dim, precision, chunk_rows, host,
                        None if ranges is None else np.asarray(ranges, np.float32))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@functools.lru_cache(maxsize=None)
def _step_fn(k: int, fn: str, precision: str, dim: int, high_ids_first: bool):
    """The jitted (query chunk, corpus chunk, offset, valid rows, running top k) -> running top k, ordered by
    score, then by the lower id (util.semantic_search's way) or the higher (faiss's, for quantized corpora)."""
    import jax
    import jax.numpy as jnp

    def decode(x):  # stored rows -> float32 [rows, dim]
        if precision in PACKED:
            raw = x.view(jnp.uint8) ^ jnp.uint8(0x80) if precision == "binary" else x
            return jnp.unpackbits(raw, axis=-1)[:, :dim].astype(jnp.float32)
        return x.astype(jnp.float32)

    def unit(x):  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def step(query, chunk, offset, valid, best_scores, best_ids):
        q, c = decode(query), decode(chunk)
        if fn == "cosine" and precision in ("float32", "float16"):
            q, c = unit(q), unit(c)
        scores = jnp.matmul(q, c.T, precision=jax.lax.Precision.HIGHEST)
        if precision in PACKED:  # minus the Hamming distance of the bit vectors
            scores = 2 * scores - q.sum(axis=1)[:, None] - c.sum(axis=1)[None, :]
        scores = jnp.where(jnp.arange(chunk.shape[0])[None, :] < valid, scores, -jnp.inf)
        rows = chunk.shape[0]
        if high_ids_first:  # top_k keeps the lower index among equals: look at the chunk back to front
            values, index = jax.lax.top_k(scores[:, ::-1], min(k, rows))
            index = rows - 1 - index
        else:
            values, index = jax.lax.top_k(scores, min(k, rows))
        index = index.astype(jnp.int32) + offset
        # Among equal scores the merge keeps what comes first: the earlier chunks' (lower) ids, or the new ones.
        first, second = ((values, index), (best_scores, best_ids)) if high_ids_first else ((best_scores, best_ids),
                                                                                          (values, index))
        values = jnp.concatenate([first[0], second[0]], axis=1)
        ids = jnp.concatenate([first[1], second[1]], axis=1)
        values, pos = jax.lax.top_k(values, k)
        return values, jnp.take_along_axis(ids, pos, axis=1)

    return jax.jit(step)


def _first_stage(queries: np.ndarray, corpus: DeviceCorpus, k: int, fn: str, query_chunk_size: int):
    """(scores float32 [Q, k], ids int64 [Q, k]) of the stored queries against the device corpus."""
    import jax
    import jax.numpy as jnp

    sharding = corpus.chunks[0].sharding
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else sharding
    # faiss's exact search (semantic_search_faiss's first stage) puts the higher id first among equal inner
    # products, the lower among equal Hamming distances (measured on pairs of equal rows; with many equal
    # rows its heap picks others).
    step = _step_fn(k, fn, corpus.precision, corpus.dim, corpus.precision in CALIBRATED)
    qc = max(1, min(int(query_chunk_size), len(queries)))
    out_scores = np.empty((len(queries), k), np.float32)
    out_ids = np.empty((len(queries), k), np.int64)
    calls = 0
    for start in range(0, len(queries), qc):
        block = queries[start:start + qc]
        padded = np.zeros((qc, queries.shape[1]), queries.dtype)
        padded[:len(block)] = block
        query = jax.device_put(padded, replicated)
        best = (jax.device_put(np.full((qc, k), -np.inf, np.float32), replicated),
                jax.device_put(np.full((qc, k), np.iinfo(np.int32).max, np.int32), replicated))
        for j, chunk in enumerate(corpus.chunks):
            offset = j * corpus.chunk_rows
            valid = min(corpus.chunk_rows, corpus.rows - offset)
            best = step(query, chunk, jnp.int32(offset), jnp.int32(valid), *best)
            calls += 1
            if calls % _SYNC_EVERY == 0:
                jax.block_until_ready(best)
        scores, ids = jax.device_get(best)
        out_scores[start:start + len(block)] = scores[:len(block)]
        out_ids[start:start + len(block)] = ids[:len(block)]
    return out_scores, out_ids


def search(query_embeddings, corpus: DeviceCorpus, top_k: int = 10, score_function="cosine", rescore: bool = True,
           rescore_multiplier: int = 2, query_chunk_size: int = DEFAULT_QUERY_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], corpus ids int64 [Q, k]) of each float query's k best rows, k = min(top_k, rows).

    float32/float16 corpora: exact top-k by cosine or dot (float32 scores). Quantized corpora: as
    sentence-transformers' semantic_search_faiss/usearch (module docstring), float64 scores after
    rescoring; with rescore=False, the first stage's scores (inner product of the quantized values, or
    minus the Hamming distance)."""
    fn = _score_function(score_function)
    queries = _as_numpy(query_embeddings)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.dtype.kind != "f":
        raise UserError(f"query embeddings must be a float [Q, D] array, got {queries.dtype} {queries.shape}")
    if queries.shape[1] != corpus.dim:
        raise UserError(f"the queries have dimension {queries.shape[1]}, the corpus {corpus.dim}; embed the queries "
                        "with the corpus's model")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UserError(f"top_k must be a positive integer, got {top_k!r}")
    if not np.isfinite(queries).all():
        raise UserError("the query embeddings hold NaN or infinite values")
    queries = queries.astype(np.float32, copy=False)
    k = min(int(top_k), corpus.rows)
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    if corpus.precision in ("float32", "float16"):
        return _first_stage(queries, corpus, k, fn, query_chunk_size)
    quantized = quantize(queries, corpus.precision, corpus.ranges)
    if not rescore:
        return _first_stage(quantized, corpus, k, fn, query_chunk_size)
    if isinstance(rescore_multiplier, bool) or not isinstance(rescore_multiplier, (int, np.integer)) or rescore_multiplier < 1:
        raise UserError(f"rescore_multiplier must be a positive integer, got {rescore_multiplier!r}")
    candidates = min(k * int(rescore_multiplier), corpus.rows)
    _, ids = _first_stage(quantized, corpus, candidates, fn, query_chunk_size)
    rows = dequantize(corpus.host_rows(ids).astype(int) if corpus.precision in CALIBRATED else corpus.host_rows(ids),
                      corpus.precision, corpus.dim, corpus.ranges)
    # sentence_transformers.util.quantization's rescoring, line for line.
    rescored = np.einsum("ij,ikj->ik", queries, rows).astype(np.float64, copy=False)
    order = np.argsort(-rescored)[:, :k]
    picked = np.arange(len(queries))[:, None]
    return rescored[picked, order], ids[picked, order]


def _hits(scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
    return [[{"corpus_id": c, "score": s} for c, s in zip(row_ids, row_scores)]
            for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]


def semantic_search(query_embeddings, corpus_embeddings, query_chunk_size: int = DEFAULT_QUERY_CHUNK,
                    corpus_chunk_size: int = DEFAULT_CHUNK_ROWS, top_k: int = 10, score_function="cosine",
                    devices=None) -> list[list[dict]]:
    """sentence_transformers.util.semantic_search on the devices: for each query, a list of
    {'corpus_id', 'score'} sorted by decreasing score, the same hits (scores to float32 rounding).

    `corpus_embeddings`: a float [N, D] array (numpy, jax or torch), or a `DeviceCorpus` from
    `place_corpus` (placed once, searched many times; quantized corpora are rescored). Memory on the
    devices: the corpus and one [query_chunk_size, corpus_chunk_size] float32 score matrix."""
    if not isinstance(corpus_embeddings, DeviceCorpus):
        corpus = _as_numpy(corpus_embeddings)
        if corpus.ndim != 2 or corpus.dtype.kind != "f":
            raise UserError(f"corpus embeddings must be a float [N, D] array, got {corpus.dtype} {corpus.shape}")
        corpus_embeddings = place_corpus(corpus.astype(np.float32, copy=False), "float32", corpus_chunk_size, devices)
    return _hits(*search(query_embeddings, corpus_embeddings, top_k, score_function,
                         query_chunk_size=query_chunk_size))


# ----------------------------------------------------------------------------- paraphrase mining

def paraphrase_mining_embeddings(embeddings, query_chunk_size: int = 5000, corpus_chunk_size: int = 100000,
                                 max_pairs: int = 500000, top_k: int = 100, devices=None) -> list[list]:
    """sentence_transformers.util.paraphrase_mining_embeddings (cosine): [score, i, j] with i < j, best
    first. Each row's top_k + 1 neighbours come from the device search (ties by the lower id)."""
    emb = _as_numpy(embeddings).astype(np.float32, copy=False)
    n = len(emb)
    if n < 2:
        return []
    corpus = place_corpus(emb, "float32", corpus_chunk_size, devices)
    pairs: list = []  # min-heap of (score, i, j), at most max_pairs
    queued: set = set()
    min_score = float("-inf")
    for start in range(0, n, query_chunk_size):
        scores, ids = _first_stage(emb[start:start + query_chunk_size], corpus, min(top_k + 1, n), "cosine",
                                   min(query_chunk_size, DEFAULT_QUERY_CHUNK))
        for r, (row_ids, row_scores) in enumerate(zip(ids.tolist(), scores.tolist())):
            i = start + r
            neighbours = [(j, s) for j, s in zip(row_ids, row_scores) if j != i][:top_k]
            for j, score in neighbours:
                if score <= min_score:
                    continue
                pair = (i, j) if i < j else (j, i)
                if pair in queued:
                    continue
                queued.add(pair)
                if len(pairs) < max_pairs:
                    heapq.heappush(pairs, (score, *pair))
                else:
                    evicted = heapq.heappushpop(pairs, (score, *pair))
                    queued.discard(evicted[1:])
                    min_score = evicted[0]
    return sorted(([score, i, j] for score, i, j in pairs), key=lambda x: x[0], reverse=True)


def paraphrase_mining(sentences: Sequence[str], model=None, batch_size: int = 32, query_chunk_size: int = 5000,
                      corpus_chunk_size: int = 100000, max_pairs: int = 500000, top_k: int = 100,
                      devices=None) -> list[list]:
    """sentence_transformers.util.paraphrase_mining: embed `sentences` and return [score, i, j] triplets
    (i < j) of the most similar pairs, best first."""
    from minilm_jax.encode import encode

    emb = encode(sentences, model, batch_size=batch_size, devices=devices)
    return paraphrase_mining_embeddings(emb, query_chunk_size, corpus_chunk_size, max_pairs, top_k, devices)
