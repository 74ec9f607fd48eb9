"""The BERT encoder as Flax Linen modules: token ids -> hidden states [B, L, D].

Numerics follow transformers' BertModel (what sentence-transformers runs): LayerNorm with the
config's eps (1e-12) and a two-pass variance, exact erf GELU, the additive attention mask with
float32's minimum, and (word + token type) + position in the embedding sum. With `dtype=bfloat16`
the matmuls run in bfloat16 while parameters, the residual stream, LayerNorm and softmax stay in
float32.

Shapes in names: B batch, L sequence length, D hidden, H heads, K head dim, F intermediate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from minilm_jax.config import BertConfig
from minilm_jax.dropout import Dropout

_init = nn.initializers.normal(stddev=0.02)  # BERT's initializer_range, for models trained from scratch


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it, not E[x^2]-mean^2.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=jnp.float32, name=name)


def _precision(dtype: Any) -> jax.lax.Precision:
    # float32 means float32: on GPU/TPU the default would round matmul inputs to TF32/bfloat16 and
    # lose parity with sentence-transformers. bfloat16 is the explicit fast path.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_init, precision=_precision(dtype),
                    name=name)


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, ids_BxL, token_types_BxL, positions_BxL, deterministic: bool):
        c = self.config
        word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=_init, name="word_embeddings")
        position = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=_init,
                            name="position_embeddings")
        token_type = nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=_init, name="token_type_embeddings")
        x_BxLxD = word(ids_BxL) + token_type(token_types_BxL)
        x_BxLxD = x_BxLxD + position(positions_BxL)
        x_BxLxD = _layer_norm(c, "layer_norm")(x_BxLxD)
        return Dropout(c.hidden_dropout_prob)(x_BxLxD, deterministic=deterministic)


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, bias_Bx1xLxL, deterministic: bool):
        c = self.config
        B, L, _ = x_BxLxD.shape
        H, K = c.num_attention_heads, c.head_dim

        def heads(name):
            return _dense(c.hidden_size, self.dtype, name)(x_BxLxD).reshape(B, L, H, K)

        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = heads("query"), heads("key"), heads("value")
        scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK, preferred_element_type=jnp.float32,
                                    precision=_precision(self.dtype))
        scores_BxHxLxL = scores_BxHxLxL / jnp.sqrt(jnp.float32(K)) + bias_Bx1xLxL
        probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
        probs_BxHxLxL = Dropout(c.attention_probs_dropout_prob)(probs_BxHxLxL, deterministic=deterministic)
        context_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL.astype(self.dtype), v_BxLxHxK,
                                     precision=_precision(self.dtype))
        context_BxLxD = context_BxLxHxK.reshape(B, L, H * K)
        out_BxLxD = _dense(c.hidden_size, self.dtype, "output")(context_BxLxD).astype(jnp.float32)
        return Dropout(c.hidden_dropout_prob)(out_BxLxD, deterministic=deterministic)


class Layer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD, bias_Bx1xLxL, deterministic: bool):
        c = self.config
        attended_BxLxD = SelfAttention(c, self.dtype, name="attention")(x_BxLxD, bias_Bx1xLxL, deterministic)
        x_BxLxD = _layer_norm(c, "attention_norm")(attended_BxLxD + x_BxLxD)
        h_BxLxF = _dense(c.intermediate_size, self.dtype, "intermediate")(x_BxLxD)
        h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=False)  # erf GELU: Flax's default is the tanh form
        out_BxLxD = _dense(c.hidden_size, self.dtype, "output")(h_BxLxF).astype(jnp.float32)
        out_BxLxD = Dropout(c.hidden_dropout_prob)(out_BxLxD, deterministic=deterministic)
        return _layer_norm(c, "output_norm")(out_BxLxD + x_BxLxD)


class BertEncoder(nn.Module):
    """Token ids -> final hidden states (float32).

    Plain rows: `mask_BxL` marks real tokens (1) and padding (0).
    Packed rows (several sentences per row, no padding between them): `segments_BxL` numbers the
    sentences of each row 1, 2, ... (0 = padding) and `positions_BxL` restarts at 0 for each one;
    a token attends only to its own sentence, so every sentence is computed exactly as alone.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids_BxL, mask_BxL=None, token_types_BxL=None, deterministic: bool = True,
                 positions_BxL=None, segments_BxL=None):
        if token_types_BxL is None:
            token_types_BxL = jnp.zeros_like(ids_BxL)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)
        x_BxLxD = Embeddings(self.config, name="embeddings")(ids_BxL, token_types_BxL, positions_BxL, deterministic)
        # Masked keys get float32's minimum added, as transformers does; a query with no allowed
        # key (padding) then softmaxes to uniform weights instead of NaN, and is never pooled.
        if segments_BxL is None:
            allowed = (mask_BxL > 0)[:, None, None, :]
        else:
            allowed = ((segments_BxL[:, :, None] == segments_BxL[:, None, :]) & (segments_BxL[:, None, :] > 0))[:, None]
        bias_Bx1xLxL = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        for i in range(self.config.num_hidden_layers):
            x_BxLxD = Layer(self.config, self.dtype, name=f"layer_{i}")(x_BxLxD, bias_Bx1xLxL, deterministic)
        return x_BxLxD


def init_params(config: BertConfig, rng: jax.Array) -> dict:
    """Fresh random encoder parameters (BERT's normal(0.02) init), as a plain nested dict."""
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = BertEncoder(config).init(rng, ids, jnp.ones_like(ids))
    return variables["params"]
