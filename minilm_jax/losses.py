"""CosineSimilarityLoss: mean over pairs of (cos(u, v) - label)^2, as sentence-transformers computes it."""

from __future__ import annotations

import jax.numpy as jnp

from minilm_jax.pooling import cosine_similarity


def cosine_mse_terms(u_BxD, v_BxD, labels_B, weights_B):
    """Weighted squared errors per pair; weight 0 marks padding rows of a short final batch."""
    error_B = cosine_similarity(u_BxD, v_BxD) - labels_B.astype(jnp.float32)
    return jnp.square(error_B) * weights_B


def cosine_mse_loss(u_BxD, v_BxD, labels_B):
    """The plain batch mean, for callers without padding rows."""
    return jnp.mean(cosine_mse_terms(u_BxD, v_BxD, labels_B, jnp.ones_like(labels_B, dtype=jnp.float32)))
