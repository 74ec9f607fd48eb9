"""The encoder and the embedding function, on a tiny random config and on the real weights:
padding invariance, jit against no-jit, dropout off unless asked for, bfloat16 close to float32,
float32 outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import st_features
from minilm_jax.config import BertConfig
from minilm_jax.embedding import sentence_embeddings
from minilm_jax.model import BertEncoder, init_params
from minilm_jax.pooling import l2_normalize, mean_pool
from minilm_jax.tokenizer import bucket_length, bucket_lengths, pad_batch

PAD_TOL = 1e-6


@pytest.fixture(scope="module")
def tiny():
    config = BertConfig.tiny()
    params = init_params(config, jax.random.PRNGKey(0))
    return config, params


@pytest.fixture(scope="module")
def tiny_rows():
    """Token-id rows of a few lengths, [CLS] ... [SEP], ids drawn from the real vocabulary range."""
    rng = np.random.default_rng(0)
    return [np.concatenate([[101], rng.integers(1000, 30000, n - 2), [102]]).astype(np.int32) for n in (5, 11, 23, 2)]


@pytest.fixture(scope="module")
def real_rows(jax_model, stsb_dev):
    texts = [stsb_dev[0][0], stsb_dev[3][1], stsb_dev[10][0], "", "A man is playing a guitar."]
    return jax_model.tokenizer.token_ids(texts)


def _jit_embed(config, dtype=jnp.float32):
    return jax.jit(functools.partial(sentence_embeddings, config=config, dtype=dtype))


def _embed_one_padded(embed, params, row, length, companions=(), rows=None):
    """Embedding of `row` when padded to `length` in a batch with `companions` (and padding rows)."""
    batch = [row, *companions]
    ids, mask = pad_batch(batch, length, rows or len(batch))
    return np.asarray(embed(params, ids, mask))[0]


# ----------------------------------------------------------------------------- tiny random config

def test_tiny_params_are_float32_with_expected_shapes(tiny):
    config, params = tiny
    leaves = jax.tree.leaves(params)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (config.vocab_size, config.hidden_size)
    assert params["layer_1"]["intermediate"]["kernel"].shape == (config.hidden_size, config.intermediate_size)
    assert "layer_2" not in params


def test_tiny_padding_invariance(tiny, tiny_rows):
    config, params = tiny
    embed = _jit_embed(config)
    row = tiny_rows[1]
    ref = _embed_one_padded(embed, params, row, len(row))
    assert np.linalg.norm(ref) == pytest.approx(1.0, abs=1e-6)
    variants = {
        "pad 16": _embed_one_padded(embed, params, row, 16),
        "pad 64": _embed_one_padded(embed, params, row, 64),
        "pad 64 + companions": _embed_one_padded(embed, params, row, 64, tiny_rows[2:]),
        "pad 32 + companion + padding rows": _embed_one_padded(embed, params, row, 32, [tiny_rows[0]], rows=8),
    }
    for name, emb in variants.items():
        diff = np.abs(emb - ref).max()
        assert diff <= PAD_TOL, f"{name}: max |diff| {diff:.3g}"


def test_tiny_padding_rows_are_zero_not_nan(tiny, tiny_rows):
    config, params = tiny
    ids, mask = pad_batch(tiny_rows[:2], 16, 4)
    out = np.asarray(_jit_embed(config)(params, ids, mask))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[2:], 0.0)


def test_tiny_jit_matches_no_jit(tiny, tiny_rows):
    config, params = tiny
    ids, mask = pad_batch(tiny_rows, 32, 4)
    jitted = np.asarray(_jit_embed(config)(params, ids, mask))
    with jax.disable_jit():
        eager = np.asarray(sentence_embeddings(params, ids, mask, config=config))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6)
    # Also un-normalised, where the scale of the values is not forced to 1.
    jitted_raw = np.asarray(jax.jit(functools.partial(sentence_embeddings, config=config, normalize=False))(
        params, ids, mask))
    with jax.disable_jit():
        eager_raw = np.asarray(sentence_embeddings(params, ids, mask, config=config, normalize=False))
    np.testing.assert_allclose(jitted_raw, eager_raw, rtol=1e-5, atol=1e-6)


def test_tiny_dropout_off_by_default_on_with_rng(tiny, tiny_rows):
    config, params = tiny
    assert config.hidden_dropout_prob > 0 and config.attention_probs_dropout_prob > 0
    ids, mask = pad_batch(tiny_rows, 32, 4)
    embed = jax.jit(functools.partial(sentence_embeddings, config=config))
    a = np.asarray(embed(params, ids, mask))
    b = np.asarray(embed(params, ids, mask))
    np.testing.assert_array_equal(a, b)
    # The module itself also defaults to deterministic: no dropout rng needed, same output twice.
    apply = jax.jit(lambda p, i, m: BertEncoder(config).apply({"params": p}, i, m))
    np.testing.assert_array_equal(np.asarray(apply(params, ids, mask)), np.asarray(apply(params, ids, mask)))

    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    d1 = np.asarray(embed(params, ids, mask, dropout_rng=k1))
    d1_again = np.asarray(embed(params, ids, mask, dropout_rng=k1))
    d2 = np.asarray(embed(params, ids, mask, dropout_rng=k2))
    np.testing.assert_array_equal(d1, d1_again)  # same rng, same mask
    assert np.abs(d1 - a).max() > 1e-3, "a dropout rng was given but the output did not change"
    assert np.abs(d1 - d2).max() > 1e-3, "two dropout rngs gave the same output"


def test_tiny_bfloat16_close_to_float32_and_outputs_float32(tiny, tiny_rows):
    config, params = tiny
    ids, mask = pad_batch(tiny_rows, 32, 4)
    f32 = np.asarray(_jit_embed(config, jnp.float32)(params, ids, mask))
    bf16_out = _jit_embed(config, jnp.bfloat16)(params, ids, mask)
    assert bf16_out.dtype == jnp.float32 and f32.dtype == np.float32
    bf16 = np.asarray(bf16_out)
    assert not np.array_equal(bf16, f32), "bfloat16 gave bit-identical results: it is not computing in bfloat16"
    cos = np.sum(bf16 * f32, axis=1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(f32, axis=1))
    assert cos.min() > 0.99, cos


def test_tiny_hidden_states_float32_under_bfloat16(tiny, tiny_rows):
    config, params = tiny
    ids, mask = pad_batch(tiny_rows, 32, 4)
    hidden = BertEncoder(config, jnp.bfloat16).apply({"params": params}, ids, mask)
    assert hidden.dtype == jnp.float32 and hidden.shape == (4, 32, config.hidden_size)


def test_pooling_numerics():
    hidden = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    pooled = np.asarray(mean_pool(hidden, mask))
    np.testing.assert_allclose(pooled[0], (np.arange(4) + np.arange(4, 8)) / 2)
    np.testing.assert_array_equal(pooled[1], 0.0)  # all padding: zeros, not NaN
    normed = np.asarray(l2_normalize(jnp.asarray(pooled)))
    assert np.isfinite(normed).all()
    np.testing.assert_allclose(np.linalg.norm(normed[0]), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(normed[1], 0.0)


def test_bucket_lengths_end_at_max_seq_length():
    buckets = bucket_lengths(256)
    assert buckets[-1] == 256 and list(buckets) == sorted(set(buckets))
    assert bucket_length(1, buckets) == buckets[0]
    assert bucket_length(256, buckets) == 256
    assert all(bucket_length(n, buckets) >= n for n in range(1, 257))
    assert bucket_lengths(128)[-1] == 128 and max(bucket_lengths(128)) == 128


# ----------------------------------------------------------------------------- real weights

def test_real_padding_invariance(jax_model, real_rows):
    embed = _jit_embed(jax_model.config)
    for row in real_rows:
        ref = _embed_one_padded(embed, jax_model.params, row, bucket_length(len(row), bucket_lengths(256)))
        others = [r for r in real_rows if r is not row]
        for length, companions, rows in ((64, (), None), (256, (), None), (64, others, None), (64, others[:1], 8)):
            emb = _embed_one_padded(embed, jax_model.params, row, length, companions, rows)
            diff = np.abs(emb - ref).max()
            assert diff <= PAD_TOL, f"{len(row)} tokens padded to {length} with {len(companions)} companions: {diff:.3g}"


def test_real_encode_independent_of_batch_companions(jax_model, stsb_dev):
    import minilm_jax

    target = stsb_dev[5][0]
    alone = minilm_jax.encode([target], jax_model)[0]
    long_companion = " ".join(a for a, _, _ in stsb_dev[:20])  # forces a longer bucket for the batch
    crowd = [s for a, b, _ in stsb_dev[100:110] for s in (a, b)]
    for batch in ([long_companion, target], crowd[:7] + [target] + crowd[7:], [target] * 3):
        emb = minilm_jax.encode(batch, jax_model, batch_size=32)[batch.index(target)]
        assert np.abs(emb - alone).max() <= PAD_TOL


def test_real_jit_matches_no_jit(jax_model, real_rows):
    ids, mask = pad_batch(real_rows[:2], 32, 2)
    jitted = np.asarray(_jit_embed(jax_model.config)(jax_model.params, ids, mask))
    with jax.disable_jit():
        eager = np.asarray(sentence_embeddings(jax_model.params, ids, mask, config=jax_model.config))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6)


def test_real_dropout_off_by_default(jax_model, stsb_dev):
    import minilm_jax

    texts = [a for a, _, _ in stsb_dev[:8]]
    np.testing.assert_array_equal(minilm_jax.encode(texts, jax_model), minilm_jax.encode(texts, jax_model))
    rows = jax_model.tokenizer.token_ids(texts)
    ids, mask = pad_batch(rows, 32, 8)
    embed = _jit_embed(jax_model.config)
    plain = np.asarray(embed(jax_model.params, ids, mask))
    dropped = np.asarray(embed(jax_model.params, ids, mask, dropout_rng=jax.random.PRNGKey(0)))
    assert np.abs(plain - dropped).max() > 1e-3
    # encode() must be the deterministic path.
    np.testing.assert_allclose(minilm_jax.encode(texts, jax_model, batch_size=8), plain, rtol=0, atol=PAD_TOL)


def test_real_bfloat16_close_to_float32(jax_model, stsb_dev):
    import minilm_jax

    texts = [s for a, b, _ in stsb_dev[200:232] for s in (a, b)]
    f32 = minilm_jax.encode(texts, jax_model)
    bf16 = minilm_jax.encode(texts, jax_model, dtype="bfloat16")
    assert f32.dtype == np.float32 and bf16.dtype == np.float32
    assert bf16.shape == f32.shape == (len(texts), 384)
    assert not np.array_equal(bf16, f32), "bfloat16 gave bit-identical results: it is not computing in bfloat16"
    cos = np.sum(bf16 * f32, axis=1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(f32, axis=1)
    assert cos.min() > 0.99, f"lowest cosine {cos.min():.4f} for {texts[int(np.argmin(cos))]!r}"


def test_real_unnormalized_output(jax_model, st_model, stsb_dev):
    import minilm_jax

    texts = [a for a, _, _ in stsb_dev[40:48]]
    raw = minilm_jax.encode(texts, jax_model, normalize=False)
    assert raw.dtype == np.float32
    assert np.abs(np.linalg.norm(raw, axis=1) - 1.0).min() > 1e-3  # really not normalised
    # sentence-transformers' output before its Normalize module: the pooled embedding.
    features = st_features(st_model, texts)
    import torch

    with torch.no_grad():
        pooled = st_model[1](st_model[0](features))["sentence_embedding"].numpy()
    np.testing.assert_allclose(raw, pooled, rtol=0, atol=1e-5)
