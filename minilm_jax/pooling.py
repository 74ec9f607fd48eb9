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


# ----------------------------------------------------------------------------- every Pooling mode
#
# sentence-transformers' Pooling (6.x, `_forward_padded`), mode by mode, for right-padded rows.
# `mask_BxL` is the pooled tokens' mask: the attention mask, with the prompt's tokens zeroed when
# Pooling's include_prompt is False.

def _first_index(mask_BxL):
    return jnp.argmax(mask_BxL > 0, axis=1)  # no pooled token: 0, as torch's argmax of zeros


def _last_index(mask_BxL):
    L = mask_BxL.shape[1]
    return L - 1 - jnp.argmax(mask_BxL[:, ::-1] > 0, axis=1)  # no pooled token: row of zeros below


def _take_row(hidden_BxLxD, index_B):
    return jnp.take_along_axis(hidden_BxLxD, index_B[:, None, None], axis=1)[:, 0]


def pool(hidden_BxLxD, mask_BxL, modes: tuple[str, ...]):
    """The pooled embeddings [B, len(modes) * D] of rows, the modes concatenated in order."""
    if modes == ("mean",):  # all-MiniLM-L6-v2's: exactly the program it always had
        return mean_pool(hidden_BxLxD, mask_BxL)
    h_BxLxD = hidden_BxLxD.astype(jnp.float32)
    m_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
    out = []
    for mode in modes:
        if mode == "mean":
            out.append(mean_pool(h_BxLxD, mask_BxL))
        elif mode == "mean_sqrt_len_tokens":
            count_Bx1 = jnp.maximum(jnp.sum(m_BxLx1, axis=1), MASK_SUM_MIN)
            out.append(jnp.sum(h_BxLxD * m_BxLx1, axis=1) / jnp.sqrt(count_Bx1))
        elif mode == "cls":  # the first pooled token: [CLS], or the first after an excluded prompt
            out.append(_take_row(h_BxLxD, _first_index(mask_BxL)))
        elif mode == "max":
            out.append(jnp.max(jnp.where(m_BxLx1 > 0, h_BxLxD, -jnp.inf), axis=1))
        elif mode == "weightedmean":  # weights 1, 2, ... by position, the prompt's positions counted
            w_BxLx1 = m_BxLx1 * jnp.arange(1, h_BxLxD.shape[1] + 1, dtype=jnp.float32)[None, :, None]
            out.append(jnp.sum(h_BxLxD * w_BxLx1, axis=1) / jnp.maximum(jnp.sum(w_BxLx1, axis=1), MASK_SUM_MIN))
        elif mode == "lasttoken":
            out.append(_take_row(h_BxLxD * m_BxLx1, _last_index(mask_BxL)))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def segment_pool(hidden_BxLxD, slots_BxL, positions_BxL, n_sentences: int, modes: tuple[str, ...]):
    """`pool` of packed rows: `slots_BxL` gives each pooled token's sentence (n_sentences for padding
    and for tokens left out of pooling), `positions_BxL` its position in its own sentence. Each
    sentence sees only its own tokens, so this equals `pool` of the sentences one per row."""
    if modes == ("mean",):
        return segment_mean_pool(hidden_BxLxD, slots_BxL, n_sentences)
    D = hidden_BxLxD.shape[-1]
    S = n_sentences
    slots = slots_BxL.reshape(-1)
    positions = positions_BxL.reshape(-1)
    h_TxD = hidden_BxLxD.reshape(-1, D).astype(jnp.float32)

    def segment_sum(x):
        return jax.ops.segment_sum(x, slots, num_segments=S + 1)[:S]

    def pick(position_S):  # the hidden state of each sentence's token at position_S (zeros if none)
        chosen_T = (slots < S) & (positions == position_S[jnp.minimum(slots, S - 1)])
        return segment_sum(jnp.where(chosen_T[:, None], h_TxD, 0.0))

    out = []
    for mode in modes:
        if mode == "mean":
            out.append(segment_mean_pool(hidden_BxLxD, slots_BxL, S))
        elif mode == "mean_sqrt_len_tokens":
            counts_Sx1 = segment_sum(jnp.ones_like(slots, jnp.float32))[:, None]
            out.append(segment_sum(h_TxD) / jnp.sqrt(jnp.maximum(counts_Sx1, MASK_SUM_MIN)))
        elif mode == "cls":
            out.append(pick(jax.ops.segment_min(positions, slots, num_segments=S + 1)[:S]))
        elif mode == "max":  # a sentence with no token here (another micro-batch's): zeros, as the other modes
            pooled_Sx1 = segment_sum(jnp.ones_like(slots, jnp.float32))[:, None] > 0
            out.append(jnp.where(pooled_Sx1, jax.ops.segment_max(h_TxD, slots, num_segments=S + 1)[:S], 0.0))
        elif mode == "weightedmean":
            w_Tx1 = (positions + 1).astype(jnp.float32)[:, None]
            out.append(segment_sum(h_TxD * w_Tx1) / jnp.maximum(segment_sum(w_Tx1), MASK_SUM_MIN))
        elif mode == "lasttoken":
            out.append(pick(jax.ops.segment_max(positions, slots, num_segments=S + 1)[:S]))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)
