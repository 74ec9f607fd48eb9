"""Token ids -> pooled (and normalised) sentence embeddings: the one function that encode,
the loss and the evaluator all go through."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minilm_jax.config import BertConfig
from minilm_jax.model import BertEncoder
from minilm_jax.pooling import l2_normalize, mean_pool, segment_mean_pool

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    from minilm_jax.errors import UserError

    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def sentence_embeddings(params, ids_BxL, mask_BxL, *, config: BertConfig, dtype=jnp.float32,
                        normalize: bool = True, dropout_rng: jax.Array | None = None):
    """Mean-pooled (and L2-normalised) embeddings [B, D] in float32. Dropout is on iff a dropout rng is given."""
    deterministic = dropout_rng is None
    hidden_BxLxD = BertEncoder(config, dtype).apply(
        {"params": params}, ids_BxL, mask_BxL, deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    pooled_BxD = mean_pool(hidden_BxLxD, mask_BxL)
    return l2_normalize(pooled_BxD) if normalize else pooled_BxD


def packed_sentence_embeddings(params, packed: dict, n_sentences: int, *, config: BertConfig, dtype=jnp.float32,
                               normalize: bool = True, dropout_rng: jax.Array | None = None):
    """Embeddings [n_sentences, D] of sentences packed several to a row (see data.pack_sentences):
    `packed` holds ids, positions, segments and slots, all [R, P]."""
    deterministic = dropout_rng is None
    hidden_RxPxD = BertEncoder(config, dtype).apply(
        {"params": params}, packed["ids"], deterministic=deterministic, positions_BxL=packed["positions"],
        segments_BxL=packed["segments"], rngs=None if deterministic else {"dropout": dropout_rng})
    pooled_SxD = segment_mean_pool(hidden_RxPxD, packed["slots"], n_sentences)
    return l2_normalize(pooled_SxD) if normalize else pooled_SxD
