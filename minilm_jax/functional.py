"""The encoder as functions for JAX programs: `tokenize` on the host, `embed` under jit/grad/vmap.

    import jax, minilm_jax

    model = minilm_jax.load()
    batch = minilm_jax.tokenize(model, ["A man plays a guitar.", "Someone plays music."], length=32)
    embed = jax.jit(minilm_jax.embed, static_argnames=("config", "normalize", "dtype"))
    emb = embed(model.params, batch, model.config)          # jax.Array float32 [2, 384]

`tokenize` is host work (the tokenizers library): it returns numpy int32 arrays of a fixed shape
[N, length], so the programs you build compile once per shape you choose. `embed` is a pure
function of arrays: differentiate it, vmap it, shard it, put it inside your own train step. It
is the same computation as `minilm_jax.encode` (`embedding.sentence_embeddings`, the one path
that encode, the loss and the evaluator share), so its results equal encode's to float32
rounding (padding to another length moves an embedding by ~1e-7).
"""

from __future__ import annotations

import weakref
from typing import Sequence

import jax
import numpy as np

from minilm_jax.checkpoint_io import Model
from minilm_jax.config import BertConfig, Head
from minilm_jax.embedding import DTYPES, compute_dtype, sentence_embeddings
from minilm_jax.errors import UserError
from minilm_jax.tokenizer import Tokenizer, check_sentences, pad_batch

# Tokenizers truncating at a length shorter than the model's max_seq_length, per model tokenizer.
_SHORTER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _truncating_at(tokenizer: Tokenizer, length: int) -> Tokenizer:
    if length >= tokenizer.max_seq_length:
        return tokenizer
    per_length = _SHORTER.setdefault(tokenizer, {})
    if length not in per_length:
        import tokenizers

        per_length[length] = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer.backend.to_str()), length)
    return per_length[length]


def tokenize(model: Model, sentences: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """Token ids and attention mask of `sentences`, each int32 [N, length] (numpy, on the host).

    Each sentence is truncated as sentence-transformers truncates it, at min(length,
    max_seq_length) tokens with [CLS] first and [SEP] last, then right-padded with [PAD] to
    `length` (default: the model's max_seq_length, 256). Returns {"ids": ..., "mask": ...}, the
    `batch` that `embed` takes.
    """
    if not isinstance(model, Model):
        raise UserError(f"model must be a minilm_jax.Model (from minilm_jax.load), got {type(model).__name__}")
    items = check_sentences(sentences)
    if length is None:
        length = model.sentence.max_seq_length
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
        raise UserError(f"length must be an integer of at least 2 ([CLS] and [SEP]), got {length!r}")
    if length > model.config.max_position_embeddings:
        raise UserError(f"length {length} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}; use a shorter length")
    tokenizer = _truncating_at(model.tokenizer, int(length))
    ids, mask = pad_batch(tokenizer.token_ids(items) if items else [], int(length), len(items), tokenizer.pad_id)
    return {"ids": ids, "mask": mask}


def embed(params, batch: dict, config: BertConfig, *, normalize: bool | None = None, dtype="float32",
          dropout_rng: jax.Array | None = None, head: Head | None = None) -> jax.Array:
    """Sentence embeddings float32 [N, D] of a tokenized batch: pure, jittable, differentiable, vmappable.

    `params` is a model's parameter tree (`model.params`, or one you trained); `batch` holds
    "ids" and "mask" [N, L] (from `tokenize`, or your own pipeline); `config` is `model.config`
    (hashable: pass it as a static argument to jax.jit, or close over it). `head` is
    `model.sentence.head`, the modules after the encoder (default: mean pooling and Normalize,
    all-MiniLM-L6-v2's); static too. `normalize`: None follows the head, False gives the
    embeddings before its Normalize, True normalises them. `dtype` "bfloat16" runs the matmuls
    in bfloat16 (pooling and normalisation stay float32). With a `dropout_rng` the encoder's
    dropout is on, as in training; without one it is off, as in `encode`.
    """
    if not isinstance(config, BertConfig):
        raise UserError(f"config must be a minilm_jax BertConfig (model.config), got {type(config).__name__}")
    if not isinstance(batch, dict) or not {"ids", "mask"} <= set(batch):
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise UserError(f"batch must be a dict with 'ids' and 'mask' (what minilm_jax.tokenize returns), got {found}")
    if head is not None and not isinstance(head, Head):
        raise UserError(f"head must be a minilm_jax Head (model.sentence.head), got {type(head).__name__}")
    compute = compute_dtype(dtype) if isinstance(dtype, str) else _dtype_name_check(dtype)
    return sentence_embeddings(params, batch["ids"], batch["mask"], config=config, head=head or Head(),
                               dtype=compute, normalize=None if normalize is None else bool(normalize),
                               dropout_rng=dropout_rng)


def _dtype_name_check(dtype):
    for compute in DTYPES.values():
        if dtype == compute:
            return compute
    raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
