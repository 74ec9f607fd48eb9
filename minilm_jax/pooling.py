"""Hidden states -> sentence embeddings, with sentence-transformers' epsilons.

Always computed in float32, whatever dtype the encoder's matmuls used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_SUM_MIN = 1e-9  # sentence-transformers Pooling: clamp(sum_mask, min=1e-9)
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps
COSINE_EPS = 1e-8  # torch.cosine_similarity's default eps


def mean_pool(hidden_BxLxD, mask_BxL):
    """Average of the hidden states of the real (mask 1) tokens; an all-padding row gives zeros."""
    mask_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
    summed_BxD = jnp.sum(hidden_BxLxD.astype(jnp.float32) * mask_BxLx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(mask_BxLx1, axis=1), MASK_SUM_MIN)
    return summed_BxD / count_Bx1


def segment_mean_pool(hidden_BxLxD, slots_BxL, n_sentences: int):
    """Mean pooling of packed rows: `slots_BxL` gives each token's sentence index (n_sentences for
    padding). Equal to mean_pool of the sentences laid out one per row."""
    D = hidden_BxLxD.shape[-1]
    slots = slots_BxL.reshape(-1)
    summed_SxD = jax.ops.segment_sum(hidden_BxLxD.reshape(-1, D).astype(jnp.float32), slots,
                                     num_segments=n_sentences + 1)[:n_sentences]
    counts_Sx1 = jax.ops.segment_sum(jnp.ones_like(slots, jnp.float32), slots, num_segments=n_sentences + 1)
    return summed_SxD / jnp.maximum(counts_Sx1[:n_sentences, None], MASK_SUM_MIN)


def l2_normalize(x_BxD, eps: float = NORMALIZE_EPS):
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    norm_Bx1 = jnp.sqrt(jnp.sum(jnp.square(x_BxD), axis=-1, keepdims=True))
    return x_BxD / jnp.maximum(norm_Bx1, eps)


def cosine_similarity(u_BxD, v_BxD):
    """Row-wise cosine, as torch.cosine_similarity: each side divided by max(norm, 1e-8) first."""
    return jnp.sum(l2_normalize(u_BxD, COSINE_EPS) * l2_normalize(v_BxD, COSINE_EPS), axis=-1)
