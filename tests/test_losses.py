"""The losses of minilm_jax.losses against their sentence-transformers twins (6.2, and 6.3 since the test stack was locked), on real
all-MiniLM-L6-v2 embeddings of real rows (Quora dev pairs, STS-B dev pairs):

- value and gradient with respect to the embeddings, for every loss and the main options;
- the gradient with respect to the encoder's parameters, through the real model, against torch's
  gradient of the sentence-transformers loss through SentenceTransformer (dropout off);
- padding rows change nothing (and get a zero gradient);
- 8 devices (fake CPU devices, in a subprocess: this file run as a script) = 1 device: the sum of
  the local losses and each device's gradient equal the one-device global loss and gradient, with
  padding rows scattered over the devices; the order of the gathered columns is checked by moving
  rows between devices and against an independent float64 computation of MNRL.

Relative differences: |ours - ST| / |ST| for values, max|ours - ST| / max|ST| for gradients.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cpu_devices_env, st_features

N_ROWS = 28  # real rows of each data set
VALUE_RTOL = 1e-5  # against sentence-transformers
GRAD_RTOL = 1e-5
DEVICE_RTOL = 1e-6  # 8 devices against 1: the same float32 maths
# B real rows against the same rows with padding among them: the similarity matmuls have other
# shapes, so XLA rounds each cosine differently (~1e-7, times the scale 20): measured up to 3.3e-6
# (MNRL). A padding row that counted would move the loss by percents: the padding rows are copies
# of real rows (a copied positive doubles the top of the softmax).
PADDING_RTOL = 1e-5
PARAM_ROWS = 8

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


# ----------------------------------------------------------------------------- the cases

def our_cases() -> dict:
    """id -> (our loss, data set, number of columns). Data sets: 'scores' (STS-B, score / 5),
    'binary' (Quora pairs with their 0/1 labels), 'triplets' (Quora duplicates as anchor/positive,
    the sentence2 of non-duplicate rows as hard negatives; labels 1)."""
    from minilm_jax import losses as L

    mnrl = L.MultipleNegativesRankingLoss
    return {
        "CosineSimilarityLoss": (L.CosineSimilarityLoss(), "scores", 2),
        "CoSENTLoss": (L.CoSENTLoss(), "scores", 2),
        "CoSENTLoss-scale-7": (L.CoSENTLoss(scale=7.0), "scores", 2),
        "AnglELoss": (L.AnglELoss(), "scores", 2),
        "AnglELoss-triplets": (L.AnglELoss(), "triplets", 4),
        "ContrastiveLoss": (L.ContrastiveLoss(), "binary", 2),
        "ContrastiveLoss-euclidean-sum": (L.ContrastiveLoss("SiameseDistanceMetric.EUCLIDEAN", margin=1.0,
                                                            size_average=False), "binary", 2),
        "ContrastiveLoss-manhattan": (L.ContrastiveLoss("SiameseDistanceMetric.MANHATTAN", margin=12.0), "binary", 2),
        "OnlineContrastiveLoss": (L.OnlineContrastiveLoss(), "binary", 2),
        "OnlineContrastiveLoss-margin-0.8": (L.OnlineContrastiveLoss(margin=0.8), "binary", 2),
        "MNRL-pairs": (mnrl(), "triplets", 2),
        "MNRL-1-negative": (mnrl(), "triplets", 3),
        "MNRL-2-negatives": (mnrl(), "triplets", 4),
        "MNRL-dot-scale-1": (mnrl(scale=1.0, similarity_fct="dot_score"), "triplets", 3),
        "MNRL-symmetric": (L.MultipleNegativesSymmetricRankingLoss(), "triplets", 3),
        "MNRL-gte-joint": (mnrl(directions=ALL_DIRECTIONS), "triplets", 4),
        "MNRL-qd-dq-joint": (mnrl(directions=("query_to_doc", "doc_to_query")), "triplets", 3),
        "MNRL-hard-in-batch": (mnrl(hardness_mode="in_batch_negatives", hardness_strength=9.0), "triplets", 3),
        "MNRL-hard-negatives": (mnrl(hardness_mode="hard_negatives", hardness_strength=5.0), "triplets", 4),
        "MNRL-hard-all": (mnrl(hardness_mode="all_negatives", hardness_strength=5.0), "triplets", 3),
        "Matryoshka-MNRL": (L.MatryoshkaLoss(mnrl(), (384, 256, 128, 64)), "triplets", 3),
        "Matryoshka-CoSENT-weighted": (L.MatryoshkaLoss(L.CoSENTLoss(), (64, 384, 128), (0.5, 2.0, 1.0)), "scores", 2),
        "Matryoshka-OnlineContrastive": (L.MatryoshkaLoss(L.OnlineContrastiveLoss(), (384, 96)), "binary", 2),
    }


def st_twin(case: str, model):
    """The sentence-transformers loss of a case, on `model`."""
    from sentence_transformers.sentence_transformer import losses as S
    from sentence_transformers.util import dot_score

    metric = S.SiameseDistanceMetric
    mnrl = S.MultipleNegativesRankingLoss
    twins = {
        "CosineSimilarityLoss": lambda: S.CosineSimilarityLoss(model),
        "CoSENTLoss": lambda: S.CoSENTLoss(model),
        "CoSENTLoss-scale-7": lambda: S.CoSENTLoss(model, scale=7.0),
        "AnglELoss": lambda: S.AnglELoss(model),
        "AnglELoss-triplets": lambda: S.AnglELoss(model),
        "ContrastiveLoss": lambda: S.ContrastiveLoss(model),
        "ContrastiveLoss-euclidean-sum": lambda: S.ContrastiveLoss(model, metric.EUCLIDEAN, margin=1.0,
                                                                   size_average=False),
        "ContrastiveLoss-manhattan": lambda: S.ContrastiveLoss(model, metric.MANHATTAN, margin=12.0),
        "OnlineContrastiveLoss": lambda: S.OnlineContrastiveLoss(model),
        "OnlineContrastiveLoss-margin-0.8": lambda: S.OnlineContrastiveLoss(model, margin=0.8),
        "MNRL-pairs": lambda: mnrl(model),
        "MNRL-1-negative": lambda: mnrl(model),
        "MNRL-2-negatives": lambda: mnrl(model),
        "MNRL-dot-scale-1": lambda: mnrl(model, scale=1.0, similarity_fct=dot_score),
        "MNRL-symmetric": lambda: S.MultipleNegativesSymmetricRankingLoss(model),
        "MNRL-gte-joint": lambda: mnrl(model, directions=ALL_DIRECTIONS),
        "MNRL-qd-dq-joint": lambda: mnrl(model, directions=("query_to_doc", "doc_to_query")),
        "MNRL-hard-in-batch": lambda: mnrl(model, hardness_mode="in_batch_negatives", hardness_strength=9.0),
        "MNRL-hard-negatives": lambda: mnrl(model, hardness_mode="hard_negatives", hardness_strength=5.0),
        "MNRL-hard-all": lambda: mnrl(model, hardness_mode="all_negatives", hardness_strength=5.0),
        "Matryoshka-MNRL": lambda: S.MatryoshkaLoss(model, mnrl(model), [384, 256, 128, 64]),
        "Matryoshka-CoSENT-weighted": lambda: S.MatryoshkaLoss(model, S.CoSENTLoss(model), [64, 384, 128],
                                                               [0.5, 2.0, 1.0]),
        "Matryoshka-OnlineContrastive": lambda: S.MatryoshkaLoss(model, S.OnlineContrastiveLoss(model), [384, 96]),
    }
    return twins[case]()


def relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


# ----------------------------------------------------------------------------- real rows, real embeddings

def _read_tsv(path: Path) -> list[tuple[str, str, float]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(a, b, float(s)) for a, b, s in reader]


def real_texts(data_dir: Path, n: int = N_ROWS) -> dict:
    """data set -> (columns of texts, labels)."""
    quora = _read_tsv(data_dir / "quora_dev.tsv")
    stsb = _read_tsv(data_dir / "stsb_dev.tsv")
    duplicates = [r for r in quora if r[2] == 1.0][:n]
    others = [r for r in quora if r[2] == 0.0][:2 * n]
    return {
        "scores": ([[r[0] for r in stsb[:n]], [r[1] for r in stsb[:n]]], np.array([r[2] / 5 for r in stsb[:n]])),
        "binary": ([[r[0] for r in quora[:n]], [r[1] for r in quora[:n]]], np.array([r[2] for r in quora[:n]])),
        "triplets": ([[r[0] for r in duplicates], [r[1] for r in duplicates], [r[1] for r in others[:n]],
                      [r[1] for r in others[n:]]], np.ones(n)),
    }


@pytest.fixture(scope="module")
def real_data(data_dir, st_model) -> dict:
    """data set -> (embeddings [C, N_ROWS, 384] float32 from all-MiniLM-L6-v2, labels float32)."""
    out = {}
    for kind, (columns, labels) in real_texts(data_dir).items():
        flat = [t for column in columns for t in column]
        emb = st_model.encode(flat, batch_size=64, convert_to_numpy=True).astype(np.float32)
        out[kind] = (emb.reshape(len(columns), N_ROWS, -1), labels.astype(np.float32))
    assert set(np.unique(out["binary"][1])) == {0.0, 1.0}
    return out


def given_embeddings_model(dim: int):
    """A real SentenceTransformer whose one module passes on the embeddings it is given, so that
    sentence-transformers' own loss code (MatryoshkaLoss's forward decorator and its questions to the
    model, such as the embedding dimension) runs on exactly our embeddings. Being a SentenceTransformer,
    it answers whatever a new release's losses ask of a model, as any model would."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.module import Module

    class GivenEmbeddings(Module):
        config_keys = ["dim"]

        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim

        def forward(self, features, **kwargs):
            features["sentence_embedding"] = features["embedding"]
            return features

        def get_embedding_dimension(self) -> int:
            return self.dim

        def save(self, output_path, *args, **kwargs):
            raise NotImplementedError("a test stand-in is never saved")

    return SentenceTransformer(modules=[GivenEmbeddings(dim)], device="cpu")


def st_value_and_grad(case: str, columns: np.ndarray, labels: np.ndarray, dtype=np.float32) -> tuple[float, np.ndarray]:
    """sentence-transformers' loss and its gradient on these embeddings, computed in `dtype`
    (float64: the exact value of its formula, free of its own float32 rounding)."""
    import torch

    model = given_embeddings_model(columns.shape[-1])
    loss = st_twin(case, model)
    leaves = [torch.tensor(c.astype(dtype), requires_grad=True) for c in columns]
    value = loss([{"embedding": leaf} for leaf in leaves], torch.tensor(labels.astype(dtype)))
    value.backward()
    return float(value.detach()), np.stack([leaf.grad.numpy() for leaf in leaves])


def our_value_and_grad(loss, columns, labels, weights=None, count=None, rng=None):
    import jax
    import jax.numpy as jnp

    weights = np.ones(columns.shape[1], np.float32) if weights is None else weights
    count = float(weights.sum()) if count is None else count
    fn = jax.jit(jax.value_and_grad(lambda c, lab, w, n: loss.local_loss(c, lab, w, n, rng=rng)))
    value, grad = fn(jnp.asarray(columns), jnp.asarray(labels), jnp.asarray(weights), jnp.float32(count))
    return float(value), np.asarray(grad)


# ----------------------------------------------------------------------------- tests (pytest)

CASES = list(our_cases())


@pytest.mark.parametrize("case", CASES)
def test_value_and_embedding_gradient_match_sentence_transformers(case, real_data):
    loss, kind, n_columns = our_cases()[case]
    columns, labels = real_data[kind]
    columns = columns[:n_columns]
    st32, st32_grad = st_value_and_grad(case, columns, labels)
    st64, st64_grad = st_value_and_grad(case, columns, labels, np.float64)
    value, grad = our_value_and_grad(loss, columns, labels)
    assert st64 != 0.0 and np.abs(st64_grad).max() > 0, f"{case}: a zero loss would test nothing"
    print(f"\n{case}: value ours {value:.8g}, ST float32 {st32:.8g} (rel {abs(value - st32) / abs(st32):.1e}), "
          f"ST float64 {st64:.8g} (rel {abs(value - st64) / abs(st64):.1e}; ST float32's own "
          f"{abs(st32 - st64) / abs(st64):.1e}); embedding gradient rel to ST float32 "
          f"{relative(grad, st32_grad):.1e}, to float64 {relative(grad, st64_grad):.1e}")
    assert abs(value - st64) <= VALUE_RTOL * abs(st64)
    assert relative(grad, st64_grad) <= GRAD_RTOL
    assert relative(grad, st32_grad) <= GRAD_RTOL
    # Against sentence-transformers' float32 value: within VALUE_RTOL once its own float32
    # rounding is allowed for (a loss near 0 computed as log(1 + small) loses ~1e-7 absolute).
    assert abs(value - st32) <= VALUE_RTOL * abs(st64) + abs(st32 - st64)


@pytest.mark.parametrize("case", CASES)
def test_name_parameters_and_citation_are_sentence_transformers(case):
    import dataclasses

    loss = our_cases()[case][0]
    twin = st_twin(case, given_embeddings_model(384))
    assert loss.name == type(twin).__name__
    ours = loss.parameters()
    if "gather_across_devices" in ours:  # ours gathers by default, sentence-transformers does not
        ours = dataclasses.replace(loss, gather_across_devices=False).parameters()
    assert ours == twin.get_config_dict()
    assert json.dumps(ours)  # the model card prints it as JSON
    assert loss.citation == getattr(twin, "citation", None)


def test_cached_losses_report_sentence_transformers_parameters(st_model):
    from sentence_transformers.sentence_transformer import losses as S

    from minilm_jax import losses as L

    model = st_model  # the Cached losses check the model's first module
    for ours, twin in ((L.CachedMultipleNegativesRankingLoss(mini_batch_size=16, gather_across_devices=False),
                        S.CachedMultipleNegativesRankingLoss(model, mini_batch_size=16)),
                       (L.CachedMultipleNegativesSymmetricRankingLoss(gather_across_devices=False),
                        S.CachedMultipleNegativesSymmetricRankingLoss(model))):
        assert ours.name == type(twin).__name__
        assert ours.parameters() == twin.get_config_dict()
        assert ours.citation == twin.citation
    assert set(L.BY_NAME) >= {"CosineSimilarityLoss", "CoSENTLoss", "AnglELoss", "ContrastiveLoss",
                              "OnlineContrastiveLoss", "MultipleNegativesRankingLoss",
                              "MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesRankingLoss",
                              "MatryoshkaLoss"}
    assert all(getattr(S, name).__name__ == name for name in L.BY_NAME)


def test_cached_loss_is_the_uncached_loss(real_data):
    from minilm_jax import losses as L

    columns, labels = real_data["triplets"]
    cached = our_value_and_grad(L.CachedMultipleNegativesRankingLoss(mini_batch_size=4), columns[:3], labels)
    plain = our_value_and_grad(L.MultipleNegativesRankingLoss(), columns[:3], labels)
    assert cached[0] == plain[0] and np.array_equal(cached[1], plain[1])


@pytest.mark.parametrize("case", CASES)
def test_padding_rows_change_nothing(case, real_data):
    """The same rows with 6 padding rows among them (copies of real rows with other labels, a
    zero vector, a random vector): the same loss and gradient, and exactly zero gradient for the
    padding rows."""
    loss, kind, n_columns = our_cases()[case]
    columns, labels = real_data[kind]
    columns = columns[:n_columns]
    rng = np.random.default_rng(7)
    n_pad = 6
    total = N_ROWS + n_pad
    pad_at = np.sort(rng.choice(total, n_pad, replace=False))
    real_at = np.setdiff1d(np.arange(total), pad_at)
    padded = np.zeros((n_columns, total, columns.shape[-1]), np.float32)
    padded[:, real_at] = columns
    padded[:, pad_at[:4]] = columns[:, rng.choice(N_ROWS, 4, replace=False)]
    padded[:, pad_at[4]] = rng.normal(size=(n_columns, columns.shape[-1]))  # pad_at[5] stays zero
    padded_labels = np.zeros(total, np.float32)
    padded_labels[real_at] = labels
    padded_labels[pad_at] = [1.0, 0.0, 1.0, 0.3, 0.0, 1.0]
    weights = np.zeros(total, np.float32)
    weights[real_at] = 1.0
    value, grad = our_value_and_grad(loss, columns, labels)
    padded_value, padded_grad = our_value_and_grad(loss, padded, padded_labels, weights, count=N_ROWS)
    assert np.isfinite(padded_grad).all()
    print(f"\n{case}: with padding rows, value rel {abs(padded_value - value) / abs(value):.1e}, "
          f"gradient rel {relative(padded_grad[:, real_at], grad):.1e}")
    assert abs(padded_value - value) <= PADDING_RTOL * abs(value)
    assert relative(padded_grad[:, real_at], grad) <= PADDING_RTOL
    assert not padded_grad[:, pad_at].any()


def test_matryoshka_n_dims_per_step(real_data):
    """n_dims_per_step trains a random subset of the dimensions: the rng picks which, the same
    rng the same ones; the loss is the sum of the picked dimensions' weighted losses."""
    import jax
    import jax.numpy as jnp

    from minilm_jax import losses as L

    columns, labels = real_data["triplets"]
    columns, labels, weights_b = jnp.asarray(columns[:2]), jnp.asarray(labels), jnp.ones(N_ROWS, jnp.float32)
    dims, weights = (384, 256, 128, 64), (1.0, 2.0, 3.0, 4.0)
    mnrl = L.MultipleNegativesRankingLoss()
    per_dim = dict(zip(dims, jax.jit(lambda c: [L.MatryoshkaLoss(mnrl, (d,)).local_loss(c, labels, weights_b, N_ROWS)
                                                for d in dims])(columns)))
    loss = L.MatryoshkaLoss(mnrl, dims, weights, n_dims_per_step=2)
    value = jax.jit(lambda c, key: loss.local_loss(c, labels, weights_b, N_ROWS, rng=key))
    seen = set()
    for seed in range(6):
        key = jax.random.PRNGKey(seed)
        mask = np.asarray(loss.dims_mask(key))
        assert mask.sum() == 2 and np.array_equal(mask, np.asarray(loss.dims_mask(key)))
        seen.add(tuple(mask))
        expected = sum(w * float(per_dim[d]) for d, w, m in zip(dims, weights, mask) if m)
        assert float(value(columns, key)) == pytest.approx(expected, rel=1e-6)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="rng"):
        loss.local_loss(columns, labels, weights_b, N_ROWS)


def test_bad_settings_and_shapes_are_refused():
    import jax.numpy as jnp

    from minilm_jax import losses as L
    from minilm_jax.errors import UserError

    for make, needle in ((lambda: L.MultipleNegativesRankingLoss(scale=0.0), "scale"),
                         (lambda: L.MultipleNegativesRankingLoss(directions=("doc_to_query",)), "query_to_doc"),
                         (lambda: L.MultipleNegativesRankingLoss(directions=ALL_DIRECTIONS,
                                                                partition_mode="per_direction"), "joint"),
                         (lambda: L.MultipleNegativesRankingLoss(hardness_mode="hardest"), "hardness_mode"),
                         (lambda: L.MultipleNegativesRankingLoss(similarity_fct="euclidean"), "similarity_fct"),
                         (lambda: L.ContrastiveLoss("cosine"), "SiameseDistanceMetric.COSINE_DISTANCE"),
                         (lambda: L.MatryoshkaLoss(L.CoSENTLoss(), ()), "at least one"),
                         (lambda: L.MatryoshkaLoss(L.CoSENTLoss(), (384, 64), (1.0,)), "one weight per"),
                         (lambda: L.CachedMultipleNegativesRankingLoss(mini_batch_size=0), "mini_batch_size")):
        with pytest.raises(UserError, match=needle):
            make()
    one = jnp.ones((1, 4, 8), jnp.float32)
    with pytest.raises(UserError, match="MultipleNegativesRankingLoss takes at least 2 text columns"):
        L.MultipleNegativesRankingLoss().local_loss(one, jnp.ones(4), jnp.ones(4), 4.0)
    with pytest.raises(UserError, match="ContrastiveLoss takes 2 text columns .* got 3; drop the --negative-column"):
        L.ContrastiveLoss().local_loss(jnp.ones((3, 4, 8)), jnp.ones(4), jnp.ones(4), 4.0)
    for loss in (L.CoSENTLoss(), L.OnlineContrastiveLoss(), L.CosineSimilarityLoss(),
                 L.MatryoshkaLoss(L.CoSENTLoss(), (8,))):
        with pytest.raises(UserError, match="drop the --negative-column"):
            L.check_columns(loss, 3)
    mnrl = L.MultipleNegativesRankingLoss()
    for loss in (L.AnglELoss(), mnrl, L.MatryoshkaLoss(mnrl, (8,))):
        L.check_columns(loss, 5)
    assert [L.BY_NAME[n]().needs_scores for n in ("CoSENTLoss", "MultipleNegativesRankingLoss")] == [True, False]
    assert L.MatryoshkaLoss(L.CachedMultipleNegativesRankingLoss(mini_batch_size=8), (8,)).mini_batch_size == 8
    assert L.MatryoshkaLoss(L.MultipleNegativesRankingLoss(), (8,)).mini_batch_size is None
    with pytest.raises(ValueError, match="exceed the embedding dimension"):
        L.MatryoshkaLoss(L.CoSENTLoss(), (16,)).local_loss(jnp.ones((2, 4, 8)), jnp.ones(4), jnp.ones(4), 4.0)


# ----------------------------------------------------------------------------- through the model

# CosineSimilarityLoss is the baseline: the recipe's loss, whose parity test_train_parity checks.
PARAM_CASES = ("MNRL-1-negative", "CoSENTLoss", "Matryoshka-MNRL", "CosineSimilarityLoss")
# Per tensor, the encoder's own float32 differences (6 layers of backward pass) reach ~4e-5 (the
# LayerNorm weights); every attention key bias has an exactly-zero true gradient (softmax ignores
# a shift shared by all keys) and is left out: both sides hold noise of ~1e-8 of the largest.
TENSOR_RTOL = 1e-4


@pytest.fixture(scope="module")
def parameter_gradients(data_dir, st_model, jax_model):
    """For each of PARAM_CASES, on 8 real STS-B rows (anchor, positive, a hard negative) with
    dropout off: our gradient w.r.t. the encoder parameters under PyTorch names, and torch's
    gradient of the sentence-transformers loss through SentenceTransformer."""
    import jax
    import jax.numpy as jnp
    import torch

    from minilm_jax.convert import to_torch_state
    from minilm_jax.embedding import sentence_embeddings
    from minilm_jax.tokenizer import pad_batch

    stsb = _read_tsv(data_dir / "stsb_dev.tsv")
    texts = [[r[0] for r in stsb[:PARAM_ROWS]], [r[1] for r in stsb[:PARAM_ROWS]],
             [r[1] for r in stsb[PARAM_ROWS:2 * PARAM_ROWS]]]
    labels = np.array([r[2] / 5 for r in stsb[:PARAM_ROWS]], np.float32)
    weights = np.ones(PARAM_ROWS, np.float32)

    ids = jax_model.tokenizer.token_ids([t for column in texts for t in column])
    length = max(len(row) for row in ids)
    ids_np, mask_np = pad_batch(ids, length, len(ids))
    config = jax_model.config

    def embed(params):
        emb = sentence_embeddings(params, jnp.asarray(ids_np), jnp.asarray(mask_np), config=config)
        return emb.reshape(len(texts), PARAM_ROWS, -1)

    @jax.jit
    def embeddings_and_param_grad(params, cotangent):
        emb, pullback = jax.vjp(embed, params)
        return emb, pullback(cotangent)[0]

    params = jax_model.params
    emb = embed(params)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in PARAM_CASES:
            loss, _, n_columns = our_cases()[case]

            def full_loss(e, loss=loss, n_columns=n_columns):
                return loss.local_loss(e[:n_columns], jnp.asarray(labels), jnp.asarray(weights),
                                       jnp.float32(PARAM_ROWS))

            value, emb_grad = jax.value_and_grad(full_loss)(emb)
            _, param_grad = embeddings_and_param_grad(params, emb_grad)
            ours = to_torch_state({"encoder": jax.device_get(param_grad), "pooler": jax_model.pooler}, config)

            st_model.zero_grad(set_to_none=True)
            st_loss = st_twin(case, st_model)
            features = [st_features(st_model, column) for column in texts[:n_columns]]
            st_value = st_loss(features, torch.tensor(labels))
            st_value.backward()
            theirs = {name: p.grad.numpy().copy() for name, p in st_model[0].auto_model.named_parameters()
                      if p.grad is not None}
            st_model.zero_grad(set_to_none=True)
            out[case] = (float(value), float(st_value.detach()), ours, theirs)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("case", PARAM_CASES)
def test_parameter_gradients_match_torch(case, parameter_gradients):
    value, st_value, ours, theirs = parameter_gradients[case]
    assert len(theirs) >= 100, sorted(theirs)  # every encoder tensor (not the unused pooler)
    assert abs(value - st_value) <= VALUE_RTOL * abs(st_value)
    top = max(np.abs(g).max() for g in theirs.values())
    zero = [name for name in theirs if name.endswith("attention.self.key.bias")]
    assert len(zero) == 6 and all(np.abs(theirs[n]).max() < 1e-6 * top for n in zero)
    worst = max((relative(ours[name], grad), name) for name, grad in theirs.items() if name not in zero)
    overall = relative(np.concatenate([ours[n].ravel() for n in theirs]),
                       np.concatenate([g.ravel() for g in theirs.values()]))
    print(f"\n{case}: loss ours {value:.8g} ST {st_value:.8g}; parameter gradient rel (all tensors together) "
          f"{overall:.2e}, worst single tensor {worst[1]} {worst[0]:.2e}")
    assert overall <= GRAD_RTOL
    assert worst[0] <= TENSOR_RTOL, f"{worst[1]}: {worst[0]:.2e}"


# ----------------------------------------------------------------------------- 8 devices = 1 device

N_DEVICES, ROWS_PER_DEVICE = 8, 4
# Each loss and every option that changes what is gathered or masked (a pmap compile per case).
DEVICE_CASES = ("CosineSimilarityLoss", "CoSENTLoss", "AnglELoss-triplets", "ContrastiveLoss", "OnlineContrastiveLoss",
                "MNRL-pairs", "MNRL-2-negatives", "MNRL-symmetric", "MNRL-gte-joint", "MNRL-hard-negatives",
                "MNRL-hard-in-batch", "Matryoshka-MNRL", "Matryoshka-OnlineContrastive")
# Global slots 32 for N_ROWS = 28 real rows. Layout A scatters the 4 padding rows over devices 1,
# 3 and 7; layout B moves every row to another device and leaves device 5 with padding only.
LAYOUT_A_PADDING = (5, 13, 30, 31)
LAYOUT_B_PADDING = (20, 21, 22, 23)


def layout(padding: tuple, seed: int | None) -> np.ndarray:
    """slot -> real row index (or -1 for padding)."""
    slots = np.full(N_DEVICES * ROWS_PER_DEVICE, -1)
    real = [s for s in range(len(slots)) if s not in padding]
    rows = np.arange(N_ROWS) if seed is None else np.random.default_rng(seed).permutation(N_ROWS)
    slots[real] = rows
    return slots


def _place(columns, labels, slots):
    """The rows laid out in slots; padding slots hold copies of real rows with flipped labels,
    except the first, all zeros (what an empty slot pools to)."""
    rng = np.random.default_rng(3)
    pad = np.flatnonzero(slots < 0)
    source = np.where(slots >= 0, slots, rng.choice(N_ROWS, len(slots)))
    out = columns[:, source].copy()
    out[:, pad[:1]] = 0.0
    lab = labels[source].copy()
    lab[pad] = 1.0 - lab[pad]
    return out, lab, (slots >= 0).astype(np.float32)


def multidevice_worker(inputs: str, output: str) -> None:
    """Run in a process with 8 fake CPU devices: for every case, the pmapped local losses and
    gradients against the one-device global loss and gradient."""
    import jax
    import jax.numpy as jnp

    assert jax.local_device_count() == N_DEVICES, jax.devices()
    data = np.load(inputs)
    results = {}
    key = jax.random.PRNGKey(0)
    for case in DEVICE_CASES:
        loss, kind, n_columns = our_cases()[case]
        columns, labels = data[f"{kind}_columns"][:n_columns], data[f"{kind}_labels"]
        c, d = columns.shape[0], columns.shape[-1]

        def one_device(cols, lab, w, loss=loss):
            return jax.value_and_grad(lambda x: loss.local_loss(x, lab, w, jnp.float32(N_ROWS), rng=key))(cols)

        def per_device(cols, lab, w, loss=loss):
            return jax.value_and_grad(lambda x: loss.local_loss(x, lab, w, jnp.float32(N_ROWS), axis_name="d",
                                                                rng=key))(cols)

        single = jax.jit(one_device)
        multi = jax.pmap(per_device, axis_name="d")
        grads_by_row = []
        out = {}
        for name, slots in (("A", layout(LAYOUT_A_PADDING, None)), ("B", layout(LAYOUT_B_PADDING, 11))):
            cols, lab, w = _place(columns, labels, slots)
            value1, grad1 = jax.device_get(single(cols, lab, w))
            sharded = cols.reshape(c, N_DEVICES, ROWS_PER_DEVICE, d).transpose(1, 0, 2, 3)
            values, grads = jax.device_get(multi(sharded, lab.reshape(N_DEVICES, -1), w.reshape(N_DEVICES, -1)))
            grad8 = np.asarray(grads).transpose(1, 0, 2, 3).reshape(c, -1, d)
            out[f"value_rel_{name}"] = abs(float(np.sum(values, dtype=np.float64)) - float(value1)) / abs(float(value1))
            out[f"grad_rel_{name}"] = relative(grad8, grad1)
            out[f"padding_grad_zero_{name}"] = bool(not grad8[:, slots < 0].any())
            out[f"finite_{name}"] = bool(np.isfinite(grad8).all() and np.isfinite(values).all())
            by_row = np.zeros((c, N_ROWS, d), np.float32)
            by_row[:, slots[slots >= 0]] = grad8[:, slots >= 0]
            grads_by_row.append(by_row)
            out[f"value_{name}"] = float(np.sum(values, dtype=np.float64))
        # Moving rows between devices (B) gives every row the same gradient as in A.
        out["moved_rows_grad_rel"] = relative(grads_by_row[1], grads_by_row[0])
        out["moved_rows_value_rel"] = abs(out["value_B"] - out["value_A"]) / abs(out["value_A"])
        if case in ("MNRL-pairs", "MNRL-2-negatives"):
            out["float64_reference_rel"] = abs(out["value_A"] - mnrl_float64(columns)) / mnrl_float64(columns)
            # The same check is sensitive: positives paired with the next device's anchors give another loss.
            rolled = np.concatenate([columns[:1], np.roll(columns[1:2], ROWS_PER_DEVICE, axis=1), columns[2:]])
            out["misaligned_rel"] = abs(mnrl_float64(rolled) - mnrl_float64(columns)) / mnrl_float64(columns)
        results[case] = out
    Path(output).write_text(json.dumps(results, indent=1))


def mnrl_float64(columns) -> float:
    """MultipleNegativesRankingLoss written out independently in float64: anchor i's positive is
    candidate i of [positives; negatives...]."""
    unit = columns.astype(np.float64) / np.linalg.norm(columns.astype(np.float64), axis=-1, keepdims=True)
    candidates = unit[1:].reshape(-1, unit.shape[-1])
    logits = 20.0 * unit[0] @ candidates.T
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_z - logits[np.arange(len(unit[0])), np.arange(len(unit[0]))]))


def test_8_devices_equal_1_device(real_data, tmp_path, repo_root):
    inputs = tmp_path / "embeddings.npz"
    np.savez(inputs, **{f"{kind}_{part}": value for kind, (cols, labels) in real_data.items()
                        for part, value in (("columns", cols), ("labels", labels))})
    env = cpu_devices_env(N_DEVICES, collective_timeouts=True)
    output = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, __file__, "multidevice", str(inputs), str(output)], env=env,
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    results = json.loads(output.read_text())
    assert set(results) == set(DEVICE_CASES)
    lines = []
    for case, r in results.items():
        lines.append(f"{case}: value {r['value_rel_A']:.1e}/{r['value_rel_B']:.1e} grad {r['grad_rel_A']:.1e}/"
                     f"{r['grad_rel_B']:.1e} moved rows {r['moved_rows_grad_rel']:.1e}")
    print("\n8 devices vs 1 (relative; layouts A/B):\n" + "\n".join(lines))
    for case, r in results.items():
        for name in ("A", "B"):
            assert r[f"finite_{name}"] and r[f"padding_grad_zero_{name}"], (case, name)
            assert r[f"value_rel_{name}"] <= DEVICE_RTOL, (case, name, r)
            assert r[f"grad_rel_{name}"] <= DEVICE_RTOL, (case, name, r)
        assert r["moved_rows_value_rel"] <= DEVICE_RTOL, (case, r)
        assert r["moved_rows_grad_rel"] <= DEVICE_RTOL, (case, r)
    for case in ("MNRL-pairs", "MNRL-2-negatives"):
        assert results[case]["float64_reference_rel"] <= 1e-5, results[case]
        assert results[case]["misaligned_rel"] > 0.1, results[case]


if __name__ == "__main__":
    if sys.argv[1:2] == ["multidevice"]:
        multidevice_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} multidevice INPUTS.npz OUTPUT.json (pytest runs the tests)")
