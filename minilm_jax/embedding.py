"""Token ids -> pooled (and normalised) sentence embeddings: the one function that encode,
the loss and the evaluator all go through.

A model's parameters are the BertEncoder's Flax params, plus `dense_0`, `dense_1`, ... ({kernel
[in, out], bias [out]}) for each Dense module of its `Head`. After the encoder comes the head,
as sentence-transformers' modules run it: Pooling (its modes concatenated), each Dense
(activation(x W + b)), then Normalize if present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minilm_jax.config import BertConfig, DenseConfig, Head
from minilm_jax.convert import DENSE_PREFIX, dense_key, encoder_params
from minilm_jax.model import BertEncoder
from minilm_jax.pooling import l2_normalize, pool, segment_pool

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_DEFAULT_HEAD = Head()


def compute_dtype(name: str):
    from minilm_jax.errors import UserError

    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_dense(params: dict, head: Head) -> None:
    from minilm_jax.errors import UserError

    found = sorted(k for k in params if k.startswith(DENSE_PREFIX))
    if found != sorted(dense_key(i) for i in range(len(head.dense))):
        raise UserError(f"the parameters hold Dense modules {found or 'none'} but the head has {len(head.dense)}; "
                        "pass the model's own head (model.sentence.head) with its parameters")


# torch.nn activations with their default arguments (DenseConfig.activation names them).
def _softplus(x):  # torch: beta 1, threshold 20 (the identity above it)
    return jnp.where(x > 20.0, x, jax.nn.softplus(x))


_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": jnp.tanh,
    "ReLU": jax.nn.relu,
    "GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "Sigmoid": jax.nn.sigmoid,
    "SiLU": jax.nn.silu,
    "LeakyReLU": lambda x: jax.nn.leaky_relu(x, 0.01),
    "ELU": jax.nn.elu,
    "Softplus": _softplus,
    "Softsign": jax.nn.soft_sign,
    "Mish": lambda x: x * jnp.tanh(_softplus(x)),
    "Hardtanh": lambda x: jnp.clip(x, -1.0, 1.0),
    "ReLU6": jax.nn.relu6,
    "SELU": jax.nn.selu,
    "CELU": jax.nn.celu,
    "Tanhshrink": lambda x: x - jnp.tanh(x),
}


def dense(params: dict, x_BxI, config: DenseConfig):
    """One Dense module in float32: activation(x @ kernel + bias)."""
    y_BxO = jnp.matmul(x_BxI, params["kernel"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if config.bias:
        y_BxO = y_BxO + params["bias"]
    return _ACTIVATIONS[config.activation](y_BxO)


def apply_head(params: dict, pooled_BxP, head: Head, normalize: bool | None = None):
    """Pooled embeddings -> the Dense modules -> Normalize (head.normalize unless `normalize` says)."""
    x = pooled_BxP
    for i, config in enumerate(head.dense):
        x = dense(params[dense_key(i)], x, config)
    return l2_normalize(x) if (head.normalize if normalize is None else normalize) else x


def sentence_embeddings(params, ids_BxL, mask_BxL, *, config: BertConfig, head: Head = _DEFAULT_HEAD,
                        dtype=jnp.float32, normalize: bool | None = None, dropout_rng: jax.Array | None = None,
                        pool_mask_BxL=None):
    """Embeddings [B, head.dimension] in float32. Dropout is on iff a dropout rng is given.

    `normalize`: None follows the head (its Normalize module); True/False normalises or not at the end.
    `pool_mask_BxL`: the tokens Pooling sees (default: the attention mask); a prompt left out of
    pooling (include_prompt False) has its tokens zeroed there."""
    _check_dense(params, head)
    deterministic = dropout_rng is None
    hidden_BxLxD = BertEncoder(config, dtype).apply(
        {"params": encoder_params(params)}, ids_BxL, mask_BxL, deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng})
    pooled = pool(hidden_BxLxD, mask_BxL if pool_mask_BxL is None else pool_mask_BxL, head.pooling)
    return apply_head(params, pooled, head, normalize)


def packed_sentence_embeddings(params, packed: dict, n_sentences: int, *, config: BertConfig,
                               head: Head = _DEFAULT_HEAD, dtype=jnp.float32, normalize: bool | None = None,
                               dropout_rng: jax.Array | None = None, prompt_lengths: tuple[int, ...] = ()):
    """Embeddings [n_sentences, D] of sentences packed several to a row (see data.pack_sentences):
    `packed` holds ids, positions, segments and slots, all [R, P]. A sentence with no token in
    `packed` (one of another micro-batch, or padding) gets a zero row, whatever the head.

    prompt_lengths (a prompt left out of pooling): per column of sentences (slot // sentences per
    column), the number of leading tokens Pooling does not see; () when every token is pooled."""
    _check_dense(params, head)
    deterministic = dropout_rng is None
    hidden_RxPxD = BertEncoder(config, dtype).apply(
        {"params": encoder_params(params)}, packed["ids"], deterministic=deterministic,
        positions_BxL=packed["positions"], segments_BxL=packed["segments"],
        rngs=None if deterministic else {"dropout": dropout_rng})
    slots = packed["slots"]
    present_S = None
    if head.dense:  # a Dense maps a zero row to activation(bias): keep absent sentences' rows zero
        present_S = jax.ops.segment_sum(jnp.ones(slots.size, jnp.float32), slots.reshape(-1),
                                        num_segments=n_sentences + 1)[:n_sentences] > 0
    if prompt_lengths and any(prompt_lengths):
        per_column = n_sentences // len(prompt_lengths)
        lengths_C = jnp.asarray(prompt_lengths, jnp.int32)
        column = jnp.minimum(slots // per_column, len(prompt_lengths) - 1)
        slots = jnp.where(packed["positions"] >= lengths_C[column], slots, n_sentences)  # the prompt: as padding
    pooled = segment_pool(hidden_RxPxD, slots, packed["positions"], n_sentences, head.pooling)
    out = apply_head(params, pooled, head, normalize)
    return out if present_S is None else jnp.where(present_S[:, None], out, 0.0)
