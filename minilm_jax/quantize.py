"""Compact embeddings with sentence-transformers' `quantize_embeddings` semantics, bit for bit.

Precisions (what each row of a [N, D] float32 matrix becomes):
- `float32`: as is; `float16`: numpy's round-to-nearest cast (not in quantize_embeddings, which has
  no float16: sentence-transformers users call `.astype(np.float16)`);
- `int8` / `uint8`: per dimension, the range [min, max] of *calibration* embeddings cut into 255
  steps; a value becomes floor((x - min) / step) clipped to 0..255 (int8: minus 128). The ranges are
  a float32 [2, D] array (row 0 the minima, row 1 the maxima), as quantize_embeddings' `ranges`;
- `binary` / `ubinary`: one bit per dimension (x > 0), packed 8 to a byte with np.packbits
  (D/8 bytes a row); binary is the ubinary byte minus 128 as int8.

Calibration when the embeddings come as a stream: quantize_embeddings without `ranges` computes them
from all the embeddings it is given, which a corpus written shard by shard does not have at once. So
`ranges_of(calibration_embeddings)` is computed once (embed_corpus.py: from the first
--calibration-rows texts of the corpus, or a given file) and every shard is quantized with those
ranges, which equals quantize_embeddings(shard, precision, ranges=ranges) and, when the calibration
rows are the whole corpus, quantize_embeddings(corpus, precision).
"""

from __future__ import annotations

import numpy as np

from minilm_jax.errors import UserError

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")
PACKED = ("binary", "ubinary")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
           "binary": np.int8, "ubinary": np.uint8}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def stored_dtype(precision: str) -> np.dtype:
    return np.dtype(_DTYPES[check_precision(precision)])


def stored_width(precision: str, dim: int) -> int:
    """Columns of a stored row: dim, or ceil(dim / 8) bytes for the packed bit precisions."""
    return (dim + 7) // 8 if check_precision(precision) in PACKED else dim


def ranges_of(calibration_embeddings: np.ndarray) -> np.ndarray:
    """float32 [2, D]: per-dimension minima and maxima, as quantize_embeddings computes them."""
    emb = np.asarray(calibration_embeddings)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise UserError(f"calibration needs at least 2 embeddings as a [N, D] array, got shape {emb.shape}; "
                        "int8/uint8 ranges from a single embedding are meaningless")
    return np.vstack((np.min(emb, axis=0), np.max(emb, axis=0))).astype(np.float32, copy=False)


def check_ranges(ranges, dim: int) -> np.ndarray:
    ranges = np.asarray(ranges)
    if ranges.shape != (2, dim) or not np.issubdtype(ranges.dtype, np.floating) or not np.isfinite(ranges).all():
        raise UserError(f"quantization ranges must be a finite float [2, {dim}] array (minima, maxima), got "
                        f"{ranges.dtype} {ranges.shape}")
    return ranges.astype(np.float32, copy=False)


def quantize(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """[N, D] float embeddings at `precision`; int8/uint8 need `ranges` ([2, D], see `ranges_of`).

    The arithmetic is quantize_embeddings' own, in the same numpy dtypes, so the bytes are equal."""
    check_precision(precision)
    emb = np.asarray(embeddings)
    if emb.dtype.kind != "f":
        raise UserError(f"embeddings to quantize must be float, got {emb.dtype}")
    if precision == "float32":
        return emb.astype(np.float32)
    if precision == "float16":
        return emb.astype(np.float16)
    if precision in CALIBRATED:
        if ranges is None:
            raise UserError(f"{precision} needs calibration ranges ([2, D] minima and maxima); compute them with "
                            "ranges_of(calibration_embeddings)")
        ranges = check_ranges(ranges, emb.shape[-1])
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q_vals = np.clip(np.floor((emb - starts) / steps), 0, 255)
        return q_vals.astype(np.uint8) if precision == "uint8" else (q_vals - 128).astype(np.int8)
    bits = np.packbits(emb > 0, axis=-1)
    return bits if precision == "ubinary" else (bits - 128).astype(np.int8)


def dequantize(stored: np.ndarray, precision: str, dim: int, ranges: np.ndarray | None = None) -> np.ndarray:
    """What sentence-transformers' rescoring compares a float query with, for stored rows: float32 rows
    as they are; int8/uint8 mapped back onto their ranges (float64, its `_dequantize_embeddings`);
    binary/ubinary unpacked to 0/1 per dimension (its `np.unpackbits`; binary's bytes first shifted
    back by 128, as its usearch path does)."""
    stored = np.asarray(stored)
    if precision in ("float32", "float16"):
        return stored.astype(np.float32)
    if precision in PACKED:
        raw = stored.view(np.uint8) ^ 0x80 if precision == "binary" else stored
        return np.unpackbits(raw, axis=-1)[..., :dim].astype(int)
    ranges = check_ranges(ranges, dim)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    values = stored.astype(np.float64)
    if precision == "int8":
        values += 128
    return values * steps + ranges[0]


def quantize_embeddings(embeddings, precision: str, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None) -> np.ndarray:
    """sentence_transformers.quantization.quantize_embeddings' signature and result, plus `float16`:
    int8/uint8 ranges from `ranges`, else from `calibration_embeddings`, else from `embeddings`."""
    emb = np.asarray(embeddings)
    if precision in CALIBRATED and ranges is None:
        ranges = ranges_of(emb if calibration_embeddings is None else calibration_embeddings)
    return quantize(emb, precision, ranges)
