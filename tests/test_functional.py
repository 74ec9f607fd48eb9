"""The functional API for JAX programs: `minilm_jax.tokenize` (host, fixed shapes) and `minilm_jax.embed`
(pure: jit, grad, vmap, shard_map), checked against `minilm_jax.encode` and sentence-transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, read_pairs_tsv, st_features
from tiny_model import write_tiny_model

EMBED_TOL = 1e-6  # embed vs encode: the same function, other padding lengths


def test_tokenize_gives_fixed_shapes_and_sentence_transformers_truncation(jax_model, st_model):
    import minilm_jax

    sentences = ["A man is playing a guitar.", "", "word " * 300, "Ünïcödé 東京 😀"]
    batch = minilm_jax.tokenize(jax_model, sentences, length=16)
    assert set(batch) == {"ids", "mask"}
    for array in batch.values():
        assert isinstance(array, np.ndarray) and array.dtype == np.int32 and array.shape == (4, 16)
    # Truncated at 16 as sentence-transformers truncates at max_seq_length 16, padded to 16.
    old = st_model.max_seq_length
    try:
        st_model.max_seq_length = 16
        theirs = st_features(st_model, sentences)
    finally:
        st_model.max_seq_length = old
    for row, (ids, mask) in enumerate(zip(theirs["input_ids"].numpy(), theirs["attention_mask"].numpy())):
        n = int(mask.sum())
        assert batch["ids"][row, :n].tolist() == ids[:n].tolist(), row
        assert batch["mask"][row].tolist() == [1] * n + [0] * (16 - n)
        assert not batch["ids"][row, n:].any()  # [PAD] is 0
    assert batch["mask"][2].all() and batch["ids"][2, -1] == 102  # the long one: cut, [SEP] kept last
    # The default length is the model's max_seq_length; an empty list gives [0, length].
    assert minilm_jax.tokenize(jax_model, sentences[:1])["ids"].shape == (1, 256)
    assert minilm_jax.tokenize(jax_model, [], length=8)["ids"].shape == (0, 8)


@pytest.mark.parametrize("call,needle", [
    (lambda m: __import__("minilm_jax").tokenize(m, ["a"], length=1), "length must be an integer of at least 2"),
    (lambda m: __import__("minilm_jax").tokenize(m, ["a"], length=513), "exceeds the model's max_position_embeddings"),
    (lambda m: __import__("minilm_jax").tokenize(m, "a single string"), "must be a list of strings"),
    (lambda m: __import__("minilm_jax").tokenize("all-MiniLM-L6-v2", ["a"]), "model must be a minilm_jax.Model"),
    (lambda m: __import__("minilm_jax").embed(m.params, {"input_ids": np.zeros((1, 4), np.int32)}, m.config),
     "batch must be a dict with 'ids' and 'mask'"),
    (lambda m: __import__("minilm_jax").embed(m.params, {"ids": 0, "mask": 0}, m.config, dtype="float16"),
     "dtype 'float16' is not supported"),
])
def test_misuse_is_a_user_error(jax_model, call, needle):
    import minilm_jax

    with pytest.raises(minilm_jax.UserError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        call(jax_model)


@pytest.fixture(scope="module")
def real_pairs(data_dir) -> list[tuple[str, str]]:
    """Eight duplicate question pairs from the real Quora training data."""
    rows = [(a, b) for a, b, score in read_pairs_tsv(data_dir / "quora_train.tsv")[:200] if score == 1.0]
    assert len(rows) >= 8
    return rows[:8]


def test_a_users_optax_loop_over_embed_matches_encode(jax_model, real_pairs):
    """A contrastive fine-tuning loop as a JAX user writes it, around minilm_jax.embed: in-batch
    negatives (scaled cosine, cross-entropy on the diagonal), optax AdamW, jax.jit(jax.grad(...)).
    embed equals encode before training, and after it for a Model holding the trained params."""
    import jax
    import jax.numpy as jnp
    import optax

    import minilm_jax

    anchors, positives = [a for a, _ in real_pairs], [b for _, b in real_pairs]
    left = minilm_jax.tokenize(jax_model, anchors, length=32)
    right = minilm_jax.tokenize(jax_model, positives, length=32)
    config = jax_model.config

    def loss_fn(params, left, right):
        u, v = minilm_jax.embed(params, left, config), minilm_jax.embed(params, right, config)
        logits = 20.0 * u @ v.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(len(anchors))).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    tx = optax.adamw(1e-4, weight_decay=0.0)
    params = jax.tree.map(jnp.asarray, jax_model.params)
    opt_state = tx.init(params)

    before = jax.jit(minilm_jax.embed, static_argnames="config")(params, left, config=config)
    assert isinstance(before, jax.Array) and before.shape == (8, 384) and before.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(before), minilm_jax.encode(anchors, jax_model), atol=EMBED_TOL)

    losses = []
    for _ in range(3):
        loss, grads = grad_fn(params, left, right)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    losses.append(float(grad_fn(params, left, right)[0]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses

    trained = jax_model.replace(params=params)
    after = np.asarray(minilm_jax.embed(params, left, config))
    encoded = minilm_jax.encode(anchors, trained)
    np.testing.assert_allclose(after, encoded, atol=EMBED_TOL)
    assert np.abs(encoded - np.asarray(before)).max() > 1e-3  # the steps did change the model


def test_vmap_over_a_leading_axis_equals_encode(jax_model):
    import jax

    import minilm_jax

    groups = [["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell."],
              ["A cat sleeps on the sofa.", "", "Two kids play soccer in the park."]]
    batches = [minilm_jax.tokenize(jax_model, g, length=24) for g in groups]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)  # ids, mask: [2, 3, 24]
    for normalize in (True, False):
        out = jax.jit(jax.vmap(lambda b: minilm_jax.embed(jax_model.params, b, jax_model.config,
                                                          normalize=normalize)))(stacked)
        assert out.shape == (2, 3, 384)
        for k, group in enumerate(groups):
            np.testing.assert_allclose(np.asarray(out[k]), minilm_jax.encode(group, jax_model, normalize=normalize),
                                       atol=EMBED_TOL * (1 if normalize else 10))


SHARD_MAP_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import minilm_jax

model = minilm_jax.load(sys.argv[1])
sentences = [f"sentence number {i} is about topic {i % 5}" for i in range(16)]
batch = minilm_jax.tokenize(model, sentences, length=16)
mesh = Mesh(np.array(jax.devices()), ("batch",))
embed = jax.jit(jax.shard_map(lambda p, b: minilm_jax.embed(p, b, model.config), mesh=mesh,
                              in_specs=(P(), P("batch")), out_specs=P("batch")))
out = embed(model.params, batch)
diff = float(np.abs(np.asarray(out) - minilm_jax.encode(sentences, model)).max())
print(json.dumps({"devices": len(jax.devices()), "shape": list(out.shape),
                  "shards": len(out.addressable_shards), "diff": diff}))
"""


def test_shard_map_over_8_devices_equals_encode(model_path, tmp_path):
    """embed inside jax.shard_map, the batch split over 8 (forced CPU) devices, in its own process."""
    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT, tiny], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8 and result["shards"] == 8 and result["shape"] == [16, 64]
    assert result["diff"] <= EMBED_TOL, result
