"""The fused dropout: its hash is Threefry-2x32 (JAX's own implementation and the Random123
known-answer vectors agree with it), it drops the stated fraction, scales the rest, draws fresh
masks per key and per module, and is the identity when deterministic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jax_random

from minilm_jax.config import BertConfig
from minilm_jax.dropout import dropout, random_bits, threefry_2x32
from minilm_jax.model import BertEncoder, init_params


def _ours(key, x0, x1):
    return [np.asarray(w) for w in jax.jit(threefry_2x32)(jnp.uint32(key[0]), jnp.uint32(key[1]),
                                                          jnp.asarray(x0, jnp.uint32), jnp.asarray(x1, jnp.uint32))]


@pytest.mark.parametrize("key, counter, expected", [
    # Random123's kat_vectors for threefry2x32_20: zeros, all ones, and the digits of pi.
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_threefry_known_answers(key, counter, expected):
    out = _ours(key, [counter[0]], [counter[1]])
    assert (int(out[0][0]), int(out[1][0])) == expected


def test_threefry_equals_jax_threefry():
    rng = np.random.default_rng(0)
    for _ in range(3):
        key = rng.integers(0, 2**32, 2, dtype=np.uint32)
        counters = rng.integers(0, 2**32, (2, 4096), dtype=np.uint32)
        ours = np.concatenate(_ours(key, counters[0], counters[1]))
        theirs = np.asarray(jax_random.threefry_2x32(jnp.asarray(key), jnp.asarray(counters.reshape(-1))))
        np.testing.assert_array_equal(ours, theirs)


def test_drop_rate_and_scale():
    x = jnp.ones((64, 12, 64, 64), jnp.float32)  # an attention-probability mask's shape, 3.1M elements
    y = np.asarray(jax.jit(lambda k: dropout(x, 0.1, k))(jax.random.PRNGKey(3)))
    dropped = np.mean(y == 0)
    sigma = np.sqrt(0.1 * 0.9 / y.size)
    assert abs(dropped - 0.1) < 5 * sigma, dropped
    np.testing.assert_allclose(y[y != 0], 1 / 0.9, rtol=1e-7)
    # No structure along any axis: the drop rate of every index of every axis stays near 0.1.
    for axis in range(y.ndim):
        per_index = np.mean(y == 0, axis=tuple(a for a in range(y.ndim) if a != axis))
        n = y.size / y.shape[axis]
        assert np.all(np.abs(per_index - 0.1) < 6 * np.sqrt(0.09 / n)), axis


def test_masks_depend_on_the_key_and_nothing_else():
    bits = jax.jit(lambda k: random_bits(k, (1000,)))
    a, b = np.asarray(bits(jax.random.PRNGKey(0))), np.asarray(bits(jax.random.PRNGKey(1)))
    np.testing.assert_array_equal(a, np.asarray(bits(jax.random.PRNGKey(0))))
    assert np.mean(a == b) < 0.01
    np.testing.assert_array_equal(a, np.asarray(random_bits(jax.random.key(0), (1000,))))  # typed keys too
    assert len(np.unique(a)) > 990


def test_rates_zero_and_one():
    x = jnp.arange(10.0)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(dropout(x, 0.0, key), x)
    np.testing.assert_array_equal(dropout(x, 1.0, key), np.zeros(10))


def test_encoder_dropout_is_deterministic_per_rng_and_off_when_deterministic():
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    params = init_params(config, jax.random.PRNGKey(0))
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 100
    mask = jnp.ones_like(ids)
    model = BertEncoder(config)

    def run(rng=None):
        if rng is None:
            return np.asarray(model.apply({"params": params}, ids, mask, deterministic=True))
        return np.asarray(model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": rng}))

    plain = run()
    np.testing.assert_array_equal(plain, run())
    first, again, other = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain) and not np.allclose(first, other)
