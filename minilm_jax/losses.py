"""The training losses of sentence-transformers 6.2, as pure JAX functions of the embeddings.

Each loss is a frozen dataclass whose fields are sentence-transformers' constructor parameters
(same names, same defaults) and whose maths is that of its `compute_loss_from_embeddings` /
`forward`, to float32 rounding:

    CosineSimilarityLoss  CoSENTLoss  AnglELoss  ContrastiveLoss  OnlineContrastiveLoss
    MultipleNegativesRankingLoss  MultipleNegativesSymmetricRankingLoss
    CachedMultipleNegativesRankingLoss  CachedMultipleNegativesSymmetricRankingLoss
    MatryoshkaLoss (wraps any of the others)

The contract with the train step
--------------------------------
    loss.local_loss(columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None) -> scalar

- `columns_CxBxD`: THIS device's embeddings of its B rows, float32, as the model outputs them
  (L2-normalised): column 0 = sentence1 / anchor, 1 = sentence2 / positive, 2.. = hard negatives.
- `labels_B`: scores or 0/1 labels, float32 (unused by the MultipleNegatives losses: give 1s).
- `weights_B`: 1 for a real row, 0 for a padding row. Padding rows count nowhere: not as anchors,
  not as in-batch candidates or negatives, not in CoSENT's pair set, not in OnlineContrastive's
  selection; their gradient is exactly 0 (they may hold anything, zero vectors included).
- `count`: the number of real rows in the GLOBAL batch (all devices); at least 1.
- `axis_name`: None on one device. Under `jax.pmap(..., axis_name=A)` (or shard_map) pass A: the
  loss all_gathers what it needs over A.
  - MultipleNegatives: this device's anchors are scored against the positives and negatives
    (and, per `directions`, the anchors) of the whole global batch, gathered in device order;
    the work per device is B x (global candidates), as it should scale.
  - The pair losses (CosineSimilarity, CoSENT, AnglE, Contrastive, OnlineContrastive): every
    device gathers the global batch's embeddings and computes the global loss as one device would
    (the same program on the same floats: the same CoSENT pair set, the same hard-pair selection),
    and returns 1/n of it. That work is a few global-batch-sized vectors, nothing next to the
    encoder.
  Guarantees: the SUM over devices of `local_loss` is the loss of the global batch computed on one
  device (axis_name=None) with all rows, and `jax.grad` of `local_loss` with respect to this
  device's embeddings, under pmap, is the gradient of that global loss with respect to those rows
  (JAX transposes all_gather into psum_scatter). So the step psums (not pmeans) the parameter
  gradients and the loss.
- `rng`: only MatryoshkaLoss with n_dims_per_step > 0 uses it (which dimensions this step trains);
  it must be the same key on every device (fold in the step, not the device).
- Everything is float32, static shapes, no host callbacks; jittable. Shapes are checked at trace
  time (too few columns raise a ValueError).

Each loss also has `name` (sentence-transformers' class name, for the model card),
`parameters()` (what sentence-transformers' `get_config_dict()` returns, as its model cards print
it), `citation` (its `citation` property, or None where it has none), `columns` (the fewest and
most text columns it takes; `check_columns(loss, n)` raises a UserError naming the fix) and
`needs_scores` (whether the data must have a score/label column; the MultipleNegatives losses
and AnglE's (anchor, positive, negatives...) rows take 1s). `BY_NAME` maps the class names to
the classes.

GradCache: the Cached* losses compute exactly their uncached twin's value (`local_loss` is the
same); their `mini_batch_size` (`getattr(loss, "mini_batch_size", None)`; MatryoshkaLoss passes
its inner loss's through) tells the train step to run the encoder in mini-batches and to
back-propagate the cached embedding gradient `jax.grad(local_loss)` through each one.

The MultipleNegatives losses gather by default (`gather_across_devices=True`, where
sentence-transformers defaults to False; on one device it changes nothing). With False each
device scores its anchors against its own rows only, as sentence-transformers' default does under
DDP: then, by design, N devices are not one device.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from minilm_jax.errors import UserError
from minilm_jax.pooling import NORMALIZE_EPS, cosine_similarity, l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPU/TPU: losses are float32 maths


# ----------------------------------------------------------------------------- the reference recipe's loss

def cosine_mse_terms(u_BxD, v_BxD, labels_B, weights_B):
    """Weighted squared errors per pair; weight 0 marks padding rows of a short final batch."""
    error_B = cosine_similarity(u_BxD, v_BxD) - labels_B.astype(jnp.float32)
    return jnp.square(error_B) * weights_B


def cosine_mse_loss(u_BxD, v_BxD, labels_B):
    """The plain batch mean, for callers without padding rows."""
    return jnp.mean(cosine_mse_terms(u_BxD, v_BxD, labels_B, jnp.ones_like(labels_B, dtype=jnp.float32)))


# ----------------------------------------------------------------------------- shared pieces

def _gather(x, axis_name, axis: int = 0):
    """The global batch: every device's rows in device order (device k's block at [k*B, (k+1)*B))."""
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True) if axis_name else x


def _n_devices(axis_name) -> int:
    return jax.lax.psum(1, axis_name) if axis_name else 1


def _share_of_global_loss(global_loss, columns_CxBxD, labels_B, weights_B, count, axis_name):
    """For the pair losses, cheap next to the encoder: every device gathers the global batch's
    embeddings, computes the global loss exactly as one device would (same shapes, same program,
    so the same floats and the same hard-pair selection), and contributes 1/n of it; the
    all_gather's transpose (psum_scatter) sums the n shares of each row's gradient onto its owner."""
    columns_CxGxD = _gather(columns_CxBxD, axis_name, axis=1)
    loss = global_loss(_safe_rows(columns_CxGxD, _gather(weights_B, axis_name)),
                       _gather(labels_B.astype(jnp.float32), axis_name), _gather(weights_B, axis_name), count)
    return loss / _n_devices(axis_name)


def _device_offset(b: int, axis_name):
    return jax.lax.axis_index(axis_name) * b if axis_name else 0


def _safe_rows(columns_CxBxD, weights_B):
    """Padding rows replaced by a constant unit vector: they may hold anything (a zero embedding's
    normalisation has a NaN gradient), and their gradient becomes exactly 0."""
    d = columns_CxBxD.shape[-1]
    real = (weights_B > 0)[None, :, None]
    return jnp.where(real, columns_CxBxD, jnp.float32(1.0 / d ** 0.5))


def check_columns(loss, n_columns: int) -> None:
    """A UserError unless `loss` takes rows of `n_columns` texts (check the data before training)."""
    low, high = loss.columns
    if n_columns < low or (high is not None and n_columns > high):
        want = (f"{low}" if high == low else f"at least {low}" if high is None else f"{low} to {high}")
        kinds = "(sentence1, sentence2)" if high == 2 else "(anchor, positive[, negatives...])"
        raise UserError(f"{loss.name} takes {want} text columns {kinds}, got {n_columns}"
                        + ("; drop the --negative-column options" if high == 2 and n_columns > 2 else ""))


def _check_columns(loss, columns_CxBxD) -> None:
    if columns_CxBxD.ndim != 3:
        raise ValueError(f"{loss.name}: embeddings must be [C, B, D], got shape {tuple(columns_CxBxD.shape)}")
    check_columns(loss, columns_CxBxD.shape[0])


def _normalize(x):  # torch.nn.functional.normalize (util.normalize_embeddings): eps 1e-12
    return l2_normalize(x, NORMALIZE_EPS)


def _matmul_t(a_NxD, b_MxD):
    return jnp.matmul(a_NxD, b_MxD.T, precision=_HIGHEST)


def cos_sim(a_NxD, b_MxD):
    """sentence_transformers.util.cos_sim: [N, M] cosines, each side normalised with eps 1e-12."""
    return _matmul_t(_normalize(a_NxD), _normalize(b_MxD))


def dot_score(a_NxD, b_MxD):
    """sentence_transformers.util.dot_score."""
    return _matmul_t(a_NxD, b_MxD)


def pairwise_cos_sim(a_BxD, b_BxD):
    """sentence_transformers.util.pairwise_cos_sim."""
    return jnp.sum(_normalize(a_BxD) * _normalize(b_BxD), axis=-1)


def pairwise_angle_sim(x_BxD, y_BxD):
    """sentence_transformers.util.pairwise_angle_sim: |cos + sin| with dimensions i and i + D/2
    paired (an odd D is zero-padded first), after L2 normalisation."""
    if x_BxD.shape[-1] % 2:
        x_BxD = jnp.pad(x_BxD, ((0, 0), (0, 1)))
        y_BxD = jnp.pad(y_BxD, ((0, 0), (0, 1)))
    nx, ny = _normalize(x_BxD), _normalize(y_BxD)
    cosines = jnp.sum(nx * ny, axis=1)
    h = nx.shape[1] // 2
    sines = jnp.sum(nx[:, h:] * ny[:, :h] - nx[:, :h] * ny[:, h:], axis=1)
    return jnp.abs(cosines + sines)


_MATRIX_SIMILARITIES = {"cos_sim": cos_sim, "dot_score": dot_score}


def _logsumexp(x_BxN):
    """log(sum(exp(x))) along the last axis, as m + log1p(sum over the other entries of
    exp(x - m)), m the largest entry. The same function (and gradient) as logsumexp, but a result
    near 0 (an easy batch's loss) keeps float32's relative precision, where log(1 + small) rounds
    the small part to ~1e-7 absolute (1e-5 relative on a loss of 0.01). A row of only -inf gives 0."""
    top_Bx1 = jnp.argmax(x_BxN, axis=-1, keepdims=True)
    m_Bx1 = jnp.take_along_axis(x_BxN, top_Bx1, axis=-1)
    m_Bx1 = jnp.where(jnp.isfinite(m_Bx1), m_Bx1, 0.0)
    is_top = jnp.arange(x_BxN.shape[-1]) == top_Bx1
    rest_B = jnp.sum(jnp.where(is_top, 0.0, jnp.exp(x_BxN - m_Bx1)), axis=-1)
    return m_Bx1[..., 0] + jnp.log1p(rest_B)


# ----------------------------------------------------------------------------- CosineSimilarityLoss

@dataclasses.dataclass(frozen=True)
class CosineSimilarityLoss:
    """mean over real pairs of (cos(u, v) - label)^2 (torch.cosine_similarity, MSELoss)."""

    name: ClassVar[str] = "CosineSimilarityLoss"
    citation: ClassVar[str | None] = None
    columns: ClassVar[tuple] = (2, 2)  # the fewest and most embedding columns it takes (None: no limit)
    needs_scores: ClassVar[bool] = True

    def parameters(self) -> dict:
        return {"loss_fct": "torch.nn.modules.loss.MSELoss",
                "cos_score_transformation": "torch.nn.modules.linear.Identity"}

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        return _share_of_global_loss(self.global_loss, columns_CxBxD, labels_B, weights_B, count, axis_name)

    def global_loss(self, columns_CxNxD, labels_N, weights_N, count):
        return jnp.sum(cosine_mse_terms(columns_CxNxD[0], columns_CxNxD[1], labels_N, weights_N)) / count


# ----------------------------------------------------------------------------- CoSENT and AnglE

def _cosent(scores_N, labels_N, weights_N):
    """log(1 + sum over real pairs (i, j) with label_j > label_i of exp(s_i - s_j)): CoSENTLoss's
    objective on already scaled scores, over a masked N x N pair matrix."""
    real_N = weights_N > 0
    pair_NxN = (labels_N[None, :] > labels_N[:, None]) & real_N[:, None] & real_N[None, :]
    diff_NxN = jnp.where(pair_NxN, scores_N[:, None] - scores_N[None, :], -jnp.inf)
    return _logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32), diff_NxN.reshape(-1)]))


@dataclasses.dataclass(frozen=True)
class CoSENTLoss:
    """CoSENT over the global batch: log(1 + sum exp(scale * (s(k,l) - s(i,j)))) for every two
    pairs whose labels order them, s = pairwise cosine. Columns beyond the first two are ignored,
    as sentence-transformers does."""

    scale: float = 20.0
    name: ClassVar[str] = "CoSENTLoss"
    columns: ClassVar[tuple] = (2, 2)  # sentence-transformers ignores more; we refuse them
    needs_scores: ClassVar[bool] = True
    citation: ClassVar[str | None] = """
@article{10531646,
    author={Huang, Xiang and Peng, Hao and Zou, Dongcheng and Liu, Zhiwei and Li, Jianxin and Liu, Kay and Wu, Jia and Su, Jianlin and Yu, Philip S.},
    journal={IEEE/ACM Transactions on Audio, Speech, and Language Processing},
    title={CoSENT: Consistent Sentence Embedding via Similarity Ranking},
    year={2024},
    doi={10.1109/TASLP.2024.3402087}
}
"""
    _similarity: ClassVar = staticmethod(pairwise_cos_sim)
    _similarity_name: ClassVar[str] = "pairwise_cos_sim"

    def parameters(self) -> dict:
        return {"scale": self.scale, "similarity_fct": self._similarity_name}

    def _pairs(self, columns_CxBxD, labels_B, weights_B):
        return columns_CxBxD[0], columns_CxBxD[1], labels_B, weights_B

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        return _share_of_global_loss(self.global_loss, columns_CxBxD, labels_B, weights_B, count, axis_name)

    def global_loss(self, columns_CxNxD, labels_N, weights_N, count):
        u, v, labels, weights = self._pairs(columns_CxNxD, labels_N, weights_N)
        return _cosent(self._similarity(u, v) * jnp.float32(self.scale), labels, weights)


@dataclasses.dataclass(frozen=True)
class AnglELoss(CoSENTLoss):
    """CoSENT with pairwise_angle_sim. With more than two columns, as sentence-transformers: the
    pairs (anchor, column k) for k >= 1, labelled `label` for the positive and `1 - label` for
    each negative."""

    name: ClassVar[str] = "AnglELoss"
    columns: ClassVar[tuple] = (2, None)
    needs_scores: ClassVar[bool] = True  # for pairs; (anchor, positive, negatives...) rows take 1s
    citation: ClassVar[str | None] = """
@inproceedings{li-li-2024-aoe,
    title = "{A}o{E}: Angle-optimized Embeddings for Semantic Textual Similarity",
    author = "Li, Xianming and Li, Jing",
    year = "2024",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2024.acl-long.101/",
    doi = "10.18653/v1/2024.acl-long.101"
}
"""
    _similarity: ClassVar = staticmethod(pairwise_angle_sim)
    _similarity_name: ClassVar[str] = "pairwise_angle_sim"

    def _pairs(self, columns_CxBxD, labels_B, weights_B):
        c = columns_CxBxD.shape[0]
        if c == 2:
            return columns_CxBxD[0], columns_CxBxD[1], labels_B, weights_B
        anchors = jnp.tile(columns_CxBxD[0], (c - 1, 1))
        others = columns_CxBxD[1:].reshape(-1, columns_CxBxD.shape[-1])
        labels = jnp.concatenate([labels_B] + [1.0 - labels_B] * (c - 2))
        return anchors, others, labels, jnp.tile(weights_B, c - 1)


# ----------------------------------------------------------------------------- Contrastive losses

_DISTANCES = ("SiameseDistanceMetric.COSINE_DISTANCE", "SiameseDistanceMetric.EUCLIDEAN",
              "SiameseDistanceMetric.MANHATTAN")


def _distance(metric: str, x_BxD, y_BxD):
    """sentence-transformers' SiameseDistanceMetric: 1 - torch.cosine_similarity, or
    F.pairwise_distance (p=2 or p=1, which adds eps 1e-6 to the difference)."""
    if metric == "SiameseDistanceMetric.COSINE_DISTANCE":
        return 1.0 - cosine_similarity(x_BxD, y_BxD)
    diff = x_BxD - y_BxD + jnp.float32(1e-6)
    if metric == "SiameseDistanceMetric.EUCLIDEAN":
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))
    return jnp.sum(jnp.abs(diff), axis=-1)


def _check_distance(metric: str) -> None:
    if metric not in _DISTANCES:
        raise UserError(f"distance_metric {metric!r} is not one of {', '.join(_DISTANCES)}")


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """0.5 * (label * d^2 + (1 - label) * relu(margin - d)^2) per pair, averaged over the real
    pairs (size_average) or summed."""

    distance_metric: str = "SiameseDistanceMetric.COSINE_DISTANCE"
    margin: float = 0.5
    size_average: bool = True
    name: ClassVar[str] = "ContrastiveLoss"
    columns: ClassVar[tuple] = (2, 2)
    needs_scores: ClassVar[bool] = True
    citation: ClassVar[str | None] = """
@inproceedings{hadsell2006dimensionality,
    author={Hadsell, R. and Chopra, S. and LeCun, Y.},
    booktitle={2006 IEEE Computer Society Conference on Computer Vision and Pattern Recognition (CVPR'06)},
    title={Dimensionality Reduction by Learning an Invariant Mapping},
    year={2006},
    volume={2},
    number={},
    pages={1735-1742},
    doi={10.1109/CVPR.2006.100}
}
"""

    def __post_init__(self):
        _check_distance(self.distance_metric)

    def parameters(self) -> dict:
        return {"distance_metric": self.distance_metric, "margin": self.margin, "size_average": self.size_average}

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        return _share_of_global_loss(self.global_loss, columns_CxBxD, labels_B, weights_B, count, axis_name)

    def global_loss(self, columns_CxNxD, labels_N, weights_N, count):
        d = _distance(self.distance_metric, columns_CxNxD[0], columns_CxNxD[1])
        terms = 0.5 * (labels_N * jnp.square(d) + (1.0 - labels_N) * jnp.square(jax.nn.relu(self.margin - d)))
        total = jnp.sum(terms * weights_N)
        return total / count if self.size_average else total


@dataclasses.dataclass(frozen=True)
class OnlineContrastiveLoss:
    """ContrastiveLoss on the hard pairs of the global batch only, summed: the positives (label 1)
    farther apart than the closest negative, and the negatives (label 0) closer than the farthest
    positive (without negatives / positives: than the mean distance of the other kind). Pairs with
    any other label are ignored."""

    distance_metric: str = "SiameseDistanceMetric.COSINE_DISTANCE"
    margin: float = 0.5
    name: ClassVar[str] = "OnlineContrastiveLoss"
    citation: ClassVar[str | None] = None
    columns: ClassVar[tuple] = (2, 2)
    needs_scores: ClassVar[bool] = True

    def __post_init__(self):
        _check_distance(self.distance_metric)

    def parameters(self) -> dict:
        return {"distance_metric": self.distance_metric, "margin": self.margin}

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        return _share_of_global_loss(self.global_loss, columns_CxBxD, labels_B, weights_B, count, axis_name)

    def global_loss(self, columns_CxNxD, labels_N, weights_N, count):
        d_N = _distance(self.distance_metric, columns_CxNxD[0], columns_CxNxD[1])
        real_N = weights_N > 0
        pos_N, neg_N = real_N & (labels_N == 1), real_N & (labels_N == 0)
        # The thresholds only select (no gradient flows through a comparison, as in torch).
        d_fixed = jax.lax.stop_gradient(d_N)
        n_pos, n_neg = jnp.sum(pos_N), jnp.sum(neg_N)
        max_pos = jnp.max(jnp.where(pos_N, d_fixed, -jnp.inf))
        min_neg = jnp.min(jnp.where(neg_N, d_fixed, jnp.inf))
        mean_pos = jnp.sum(jnp.where(pos_N, d_fixed, 0.0)) / jnp.maximum(n_pos, 1)
        mean_neg = jnp.sum(jnp.where(neg_N, d_fixed, 0.0)) / jnp.maximum(n_neg, 1)
        hard_neg = neg_N & (d_fixed < jnp.where(n_pos > 0, max_pos, mean_neg))
        hard_pos = pos_N & (d_fixed > jnp.where(n_neg > 0, min_neg, mean_pos))
        positive_loss = jnp.sum(jnp.where(hard_pos, jnp.square(d_N), 0.0))
        negative_loss = jnp.sum(jnp.where(hard_neg, jnp.square(jax.nn.relu(self.margin - d_N)), 0.0))
        return positive_loss + negative_loss


# ----------------------------------------------------------------------------- MultipleNegativesRankingLoss

_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")

_OORD = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
_GTE = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""
_JINA = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""
_GRADCACHE = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


@dataclasses.dataclass(frozen=True)
class MultipleNegativesRankingLoss:
    """InfoNCE with in-batch negatives over the global batch: for each real anchor i, the cross
    entropy of its positive among the candidates: every real row's positive and hard negatives
    (query_to_doc), plus, as `directions` asks, the other anchors (query_to_query), the anchors seen
    from the positive (doc_to_query), the other rows' documents seen from the positive
    (doc_to_doc); one softmax over all ("joint") or one per direction, averaged ("per_direction").
    Optional hardness weighting adds hardness_strength * stop_gradient(cos) to negative logits.
    The mean over the global batch's real anchors."""

    scale: float = 20.0
    similarity_fct: str = "cos_sim"
    directions: tuple = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    gather_across_devices: bool = True
    name: ClassVar[str] = "MultipleNegativesRankingLoss"
    columns: ClassVar[tuple] = (2, None)
    needs_scores: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "directions", tuple(self.directions))
        if not self.scale > 0:
            raise UserError(f"{self.name}: scale must be positive, got {self.scale}")
        if self.similarity_fct not in _MATRIX_SIMILARITIES:
            raise UserError(f"{self.name}: similarity_fct {self.similarity_fct!r} is not one of "
                            f"{', '.join(_MATRIX_SIMILARITIES)}")
        bad = [d for d in self.directions if d not in _DIRECTIONS]
        if not self.directions or bad:
            raise UserError(f"{self.name}: directions {list(self.directions)} must be taken from "
                            f"{', '.join(_DIRECTIONS)}")
        if "query_to_doc" not in self.directions:
            raise UserError(f"{self.name}: directions must include 'query_to_doc' (it holds the positive pair)")
        if len(set(self.directions)) != len(self.directions):
            raise UserError(f"{self.name}: directions {list(self.directions)} repeat a direction")
        if self.partition_mode not in ("joint", "per_direction"):
            raise UserError(f"{self.name}: partition_mode must be 'joint' or 'per_direction', "
                            f"got {self.partition_mode!r}")
        if self.partition_mode == "per_direction" and set(self.directions) & {"query_to_query", "doc_to_doc"}:
            raise UserError(f"{self.name}: partition_mode 'per_direction' cannot take 'query_to_query' or 'doc_to_doc' "
                            "(their candidates never include the positive); use partition_mode 'joint'")
        if self.hardness_mode not in _HARDNESS:
            raise UserError(f"{self.name}: hardness_mode must be one of {', '.join(map(str, _HARDNESS))}, "
                            f"got {self.hardness_mode!r}")
        if self.hardness_strength < 0:
            raise UserError(f"{self.name}: hardness_strength must be non-negative, got {self.hardness_strength}")

    def parameters(self) -> dict:
        return {"scale": self.scale, "similarity_fct": self.similarity_fct,
                "gather_across_devices": self.gather_across_devices,
                "directions": self.directions, "partition_mode": self.partition_mode,
                "hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength}

    @property
    def citation(self) -> str:
        if set(self.directions) == set(_DIRECTIONS) and self.partition_mode == "joint":
            return _GTE
        if set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return _JINA
        return _OORD

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        sim = _MATRIX_SIMILARITIES[self.similarity_fct]
        safe = _safe_rows(columns_CxBxD, weights_B)
        c, b, d = safe.shape
        k = c - 1  # document columns: the positive, then the hard negatives
        queries_BxD, positives_BxD = safe[0], safe[1]
        axis = axis_name if self.gather_across_devices else None  # None: this device's rows only
        queries_GxD = _gather(queries_BxD, axis)
        # [K, G, D] -> [K*G, D]: all positives, then all first negatives, ... (sentence-transformers' order)
        docs_KGxD = _gather(safe[1:], axis, axis=1).reshape(-1, d)
        real_G = _gather(weights_B, axis) > 0
        g = real_G.shape[0]
        own_BxG = jnp.arange(g)[None, :] == (_device_offset(b, axis) + jnp.arange(b))[:, None]
        own_BxKG = jnp.tile(own_BxG, (1, k))
        real_KG = jnp.tile(real_G, k)

        raw = {"query_to_doc": sim(queries_BxD, docs_KGxD)}
        invalid = {"query_to_doc": ~real_KG[None, :]}
        if "query_to_query" in self.directions:
            raw["query_to_query"] = sim(queries_BxD, queries_GxD)
            invalid["query_to_query"] = own_BxG | ~real_G[None, :]
        if "doc_to_query" in self.directions:
            raw["doc_to_query"] = sim(queries_GxD, positives_BxD).T
            invalid["doc_to_query"] = ~real_G[None, :]
        if "doc_to_doc" in self.directions:
            raw["doc_to_doc"] = sim(docs_KGxD, positives_BxD).T
            invalid["doc_to_doc"] = own_BxKG | ~real_KG[None, :]

        logits = {key: value * jnp.float32(self.scale) for key, value in raw.items()}
        if self.hardness_mode is not None and self.hardness_strength > 0:
            penalty = self.hardness_strength * jax.lax.stop_gradient(raw["query_to_doc"])
            is_positive_column = (jnp.arange(k * g) < g)[None, :]
            if self.hardness_mode == "hard_negatives":  # only the row's own hard negatives
                penalised = own_BxKG & ~is_positive_column
            elif self.hardness_mode == "in_batch_negatives":  # everything of the other rows
                penalised = ~own_BxKG
            else:  # all_negatives: everything but the row's own positive
                penalised = ~(own_BxKG & is_positive_column)
            logits["query_to_doc"] = logits["query_to_doc"] + jnp.where(penalised, penalty, 0.0)

        positive_Bx1 = jnp.sum(jnp.where(own_BxKG & (jnp.arange(k * g) < g)[None, :], logits["query_to_doc"], 0.0),
                               axis=1, keepdims=True)
        if "doc_to_query" in logits:
            # Its own-pair entry is the positive's similarity again: take the very same float, so that
            # it cancels exactly below (another matmul rounds it differently, by up to ~1e-5 at scale 20).
            logits["doc_to_query"] = jnp.where(own_BxG, positive_Bx1, logits["doc_to_query"])
        # log_z - positive, as log-sum-exp of (logit - positive): the same function as
        # sentence-transformers' -(positive - logsumexp(logits)), without the cancellation of two
        # numbers near `scale` (float32 rounding of ~1e-6 on a loss that may be ~0.05).
        shifted = [jnp.where(invalid[key], -jnp.inf, logits[key] - positive_Bx1) for key in logits]
        if self.partition_mode == "joint":
            terms_B = _logsumexp(jnp.concatenate(shifted, axis=1))
        else:
            terms_B = sum(_logsumexp(m) for m in shifted) / len(shifted)
        return jnp.sum(jnp.where(weights_B > 0, terms_B, 0.0)) / count


@dataclasses.dataclass(frozen=True)
class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss with directions (query_to_doc, doc_to_query), per_direction:
    sentence-transformers 6.2 keeps this class (deprecated) with exactly that meaning."""

    directions: tuple = ("query_to_doc", "doc_to_query")
    partition_mode: str = "per_direction"
    name: ClassVar[str] = "MultipleNegativesSymmetricRankingLoss"

    def __post_init__(self):
        super().__post_init__()
        if self.directions != ("query_to_doc", "doc_to_query") or self.partition_mode != "per_direction" \
                or self.hardness_mode is not None:
            raise UserError(f"{self.name} has fixed directions, partition mode and no hardness weighting; "
                            "for other settings use MultipleNegativesRankingLoss")


@dataclasses.dataclass(frozen=True)
class CachedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss computed with GradCache (the train step embeds in mini-batches
    of `mini_batch_size` sentences); the loss and its gradient are the uncached loss's."""

    mini_batch_size: int = 32
    name: ClassVar[str] = "CachedMultipleNegativesRankingLoss"

    def __post_init__(self):
        super().__post_init__()
        size = self.mini_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"{self.name}: mini_batch_size must be a positive integer, got {self.mini_batch_size!r}")

    def parameters(self) -> dict:
        p = super().parameters()
        return {"scale": p["scale"], "similarity_fct": p["similarity_fct"], "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": None, **{key: p[key] for key in list(p)[2:]}}

    @property
    def citation(self) -> str:
        return _GRADCACHE


@dataclasses.dataclass(frozen=True)
class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    directions: tuple = ("query_to_doc", "doc_to_query")
    partition_mode: str = "per_direction"
    name: ClassVar[str] = "CachedMultipleNegativesSymmetricRankingLoss"

    def __post_init__(self):
        super().__post_init__()
        if self.directions != ("query_to_doc", "doc_to_query") or self.partition_mode != "per_direction" \
                or self.hardness_mode is not None:
            raise UserError(f"{self.name} has fixed directions, partition mode and no hardness weighting; "
                            "for other settings use CachedMultipleNegativesRankingLoss")


# ----------------------------------------------------------------------------- MatryoshkaLoss

@dataclasses.dataclass(frozen=True)
class MatryoshkaLoss:
    """sum over dims of weight * inner loss on the embeddings truncated to their first `dim`
    values and L2-normalised again (eps 1e-12). Dimensions are sorted largest first, as
    sentence-transformers does. n_dims_per_step > 0 trains a random subset of that many
    dimensions per step (chosen by `rng`, the same on every device); -1 (the default) all."""

    loss: object
    matryoshka_dims: tuple
    matryoshka_weights: tuple | None = None
    n_dims_per_step: int = -1
    name: ClassVar[str] = "MatryoshkaLoss"
    citation: ClassVar[str | None] = """
@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

    def __post_init__(self):
        dims = tuple(int(d) for d in self.matryoshka_dims)
        if not dims:
            raise UserError("MatryoshkaLoss needs at least one dimension in matryoshka_dims")
        if any(d <= 0 for d in dims):
            raise UserError(f"MatryoshkaLoss: every dimension must be > 0, got {list(dims)}")
        weights = (1,) * len(dims) if self.matryoshka_weights is None else tuple(self.matryoshka_weights)
        if len(weights) != len(dims):
            raise UserError(f"MatryoshkaLoss: {len(weights)} matryoshka_weights for {len(dims)} matryoshka_dims; "
                            "give one weight per dimension")
        if isinstance(self.loss, MatryoshkaLoss) or not hasattr(self.loss, "local_loss"):
            raise UserError(f"MatryoshkaLoss wraps one of the other losses, got {type(self.loss).__name__}")
        order = sorted(range(len(dims)), key=lambda i: dims[i], reverse=True)  # stable, as Python's sorted
        object.__setattr__(self, "matryoshka_dims", tuple(dims[i] for i in order))
        object.__setattr__(self, "matryoshka_weights", tuple(weights[i] for i in order))

    @property
    def columns(self) -> tuple:
        return self.loss.columns

    @property
    def needs_scores(self) -> bool:
        return self.loss.needs_scores

    @property
    def mini_batch_size(self) -> int | None:
        return getattr(self.loss, "mini_batch_size", None)

    def parameters(self) -> dict:
        return {"loss": self.loss.name, "matryoshka_dims": self.matryoshka_dims,
                "matryoshka_weights": self.matryoshka_weights, "n_dims_per_step": self.n_dims_per_step}

    def dims_mask(self, rng) -> jax.Array:
        """1 for the dimensions trained this step, 0 for the others (float32 [len(dims)])."""
        n = len(self.matryoshka_dims)
        if not 0 < self.n_dims_per_step < n:
            return jnp.ones((n,), jnp.float32)
        if rng is None:
            raise ValueError("MatryoshkaLoss with n_dims_per_step > 0 needs an rng (the same key on every device)")
        chosen = jax.random.permutation(rng, n)[:self.n_dims_per_step]
        return jnp.zeros((n,), jnp.float32).at[chosen].set(1.0)

    def local_loss(self, columns_CxBxD, labels_B, weights_B, count, axis_name=None, *, rng=None):
        _check_columns(self, columns_CxBxD)
        full = columns_CxBxD.shape[-1]
        if max(self.matryoshka_dims) > full:
            raise ValueError(f"matryoshka_dims {list(self.matryoshka_dims)} exceed the embedding dimension {full}")
        mask = self.dims_mask(rng)
        safe = _safe_rows(columns_CxBxD, weights_B)
        total = jnp.float32(0.0)
        for i, (dim, weight) in enumerate(zip(self.matryoshka_dims, self.matryoshka_weights)):
            truncated = _normalize(safe[..., :dim])
            inner = self.loss.local_loss(truncated, labels_B, weights_B, count, axis_name)
            total = total + mask[i] * jnp.float32(weight) * inner
        return total


BY_NAME = {cls.name: cls for cls in (
    CosineSimilarityLoss, CoSENTLoss, AnglELoss, ContrastiveLoss, OnlineContrastiveLoss,
    MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss,
    CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss, MatryoshkaLoss)}
"""sentence-transformers' class name -> our class (for `--loss NAME` and the model card)."""
