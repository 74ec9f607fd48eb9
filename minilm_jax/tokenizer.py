"""Texts -> int32 token ids and masks, truncated like sentence-transformers and padded to buckets.

sentence-transformers truncates at `max_seq_length` (256 for all-MiniLM-L6-v2), not at the 128
baked into the checkpoint's tokenizer.json, and pads each batch to its longest row. We truncate
the same way; padding is to a small ladder of bucket lengths so that jit compiles a bounded set
of programs (padding does not change an embedding, see tests/test_encoder.py).
"""

from __future__ import annotations

import bisect
import os
from typing import Sequence

import numpy as np
import tokenizers

from minilm_jax.errors import UserError


def bucket_lengths(max_seq_length: int) -> tuple[int, ...]:
    """The sequence lengths batches are padded to: fine steps where most sentences fall,
    coarser ones beyond, always ending at max_seq_length."""
    # Steps of 4 up to 64 tokens: padding to steps of 8 cost 15% of encode throughput on
    # question-length text (bench/experiments/encode_buckets.py); the compile cache keeps the
    # extra programs cheap after the first run.
    ladder = [*range(8, 65, 4), *range(80, 129, 16), *range(160, 513, 32)]
    return tuple(n for n in ladder if n < max_seq_length) + (max_seq_length,)


def bucket_length(n_tokens: int, buckets: Sequence[int]) -> int:
    return buckets[min(bisect.bisect_left(buckets, n_tokens), len(buckets) - 1)]


def check_sentences(sentences, what: str = "sentences") -> list[str]:
    """A list of str that the tokenizer can take, or a clear error naming the first item that is not:
    a non-string, or a string that is not encodable as UTF-8 (a lone surrogate such as "\\ud800",
    which tokenizers would reject with an error that names no sentence)."""
    if isinstance(sentences, (str, bytes)):
        raise UserError(f"{what} must be a list of strings, got a single {type(sentences).__name__}")
    try:
        items = list(sentences)
    except TypeError:
        raise UserError(f"{what} must be a list of strings, got {type(sentences).__name__}") from None
    for i, s in enumerate(items):
        if not isinstance(s, str):
            hint = " (decode bytes with .decode('utf-8'))" if isinstance(s, (bytes, bytearray)) else ""
            raise UserError(f"{what}[{i}] is {type(s).__name__} {s!r:.40}, not a string; pass only str items{hint}")
        if not s.isascii():
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"{what}[{i}] is not valid Unicode text: it holds the lone surrogate "
                                f"{s[e.start]!r} at character {e.start} (text decoded with errors='surrogateescape' "
                                "or a broken surrogate pair); decode the source properly or remove the character"
                                ) from None
    return items


class Tokenizer:
    """A `tokenizers.Tokenizer` set to truncate at max_seq_length and never pad."""

    def __init__(self, backend: tokenizers.Tokenizer, max_seq_length: int):
        backend.no_padding()
        backend.enable_truncation(max_length=max_seq_length, strategy="longest_first")
        self.backend = backend
        self.max_seq_length = max_seq_length
        self.pad_id = backend.token_to_id("[PAD]") or 0

    @classmethod
    def from_folder(cls, folder: str, max_seq_length: int) -> "Tokenizer":
        path = os.path.join(folder, "tokenizer.json")
        vocab = os.path.join(folder, "vocab.txt")
        if os.path.exists(path):
            try:
                backend = tokenizers.Tokenizer.from_file(path)
            except Exception as e:  # tokenizers raises its own Exception subclass with a parse message
                raise UserError(f"{path} could not be read ({e}); replace it with a valid tokenizer.json") from None
        elif os.path.exists(vocab):
            backend = _wordpiece_from_vocab(folder, vocab)
        else:
            raise UserError(f"{folder} has neither tokenizer.json nor vocab.txt; copy the model's tokenizer files there")
        return cls(backend, max_seq_length)

    def token_ids(self, sentences: Sequence[str]) -> list[np.ndarray]:
        """Token ids (with [CLS]/[SEP]) of each sentence, truncated, unpadded."""
        encodings = self.backend.encode_batch(list(sentences), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def token_lengths(self, sentences: Sequence[str]) -> np.ndarray:
        """The number of token ids `token_ids` gives for each sentence, as an int64 array."""
        encodings = self.backend.encode_batch(list(sentences), add_special_tokens=True)
        return np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))


def _wordpiece_from_vocab(folder: str, vocab: str) -> tokenizers.Tokenizer:
    """Older checkpoints ship only vocab.txt: build the same BERT WordPiece pipeline from it."""
    import json

    lower = True
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            lower = bool(json.load(f).get("do_lower_case", True))
    from tokenizers.implementations import BertWordPieceTokenizer

    return BertWordPieceTokenizer(vocab, lowercase=lower)._tokenizer


def pad_batch(ids: Sequence[np.ndarray], length: int, rows: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack token-id rows into [rows, length] ids and mask; missing rows are all padding."""
    out_ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for r, row in enumerate(ids):
        out_ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    return out_ids, mask
