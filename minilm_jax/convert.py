"""The declared parameter table between minilm-jax and a PyTorch BertModel state dict.

One row per tensor: (our path, PyTorch tensor name, transform). The same table drives both
directions; `transpose` is its own inverse (Linear weights are [out, in] in PyTorch and
[in, out] in Flax). Nothing is guessed from suffixes or shapes: a tensor the table does not
name is an error, and so is a table row with no tensor or a tensor of the wrong shape.

Our weights are a nested dict {"encoder": <Flax params of BertEncoder>, "pooler": {...}}. The
pooler is not used for sentence embeddings; it is carried through so that an exported model
holds every tensor of the original BertModel. A sentence-transformers Dense module has its own
small table (`dense_table`): our `dense_<i>/kernel|bias` and its file's `linear.weight|bias`.

This module knows names and arrays only; reading and writing files is checkpoint_io's job.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

import numpy as np

from minilm_jax.config import BertConfig, DenseConfig
from minilm_jax.errors import UserError

Transform = Literal["identity", "transpose"]

# Our parameters of sentence-transformers' Dense modules: dense_0, dense_1, ... beside the encoder's.
DENSE_PREFIX = "dense_"


def dense_key(i: int) -> str:
    return f"{DENSE_PREFIX}{i}"


def encoder_params(params: dict) -> dict:
    """The BertEncoder's part of a model's parameters (without the Dense modules')."""
    return {k: v for k, v in params.items() if not k.startswith(DENSE_PREFIX)}


# A registered buffer of BertModel, not a parameter: dropped on import, rebuilt on export.
POSITION_IDS = "embeddings.position_ids"
# Prefixes other libraries put before BertModel names (BertForXxx checkpoints, some ST exports).
_KNOWN_PREFIXES = ("bert.", "model.", "0.auto_model.")


@dataclasses.dataclass(frozen=True)
class Row:
    ours: str  # '/'-joined path in our weights dict
    theirs: str  # PyTorch state-dict name
    transform: Transform
    shape: tuple[int, ...]  # our shape; theirs is reversed for 'transpose'


def _linear(ours: str, theirs: str, n_in: int, n_out: int) -> list[Row]:
    return [Row(f"{ours}/kernel", f"{theirs}.weight", "transpose", (n_in, n_out)),
            Row(f"{ours}/bias", f"{theirs}.bias", "identity", (n_out,))]


def _layer_norm(ours: str, theirs: str, d: int) -> list[Row]:
    return [Row(f"{ours}/scale", f"{theirs}.weight", "identity", (d,)),
            Row(f"{ours}/bias", f"{theirs}.bias", "identity", (d,))]


def parameter_table(config: BertConfig) -> list[Row]:
    """Every tensor of a BertModel with this config, paired with its place in our weights."""
    D, F = config.hidden_size, config.intermediate_size
    rows = [
        Row("encoder/embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", "identity",
            (config.vocab_size, D)),
        Row("encoder/embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight",
            "identity", (config.max_position_embeddings, D)),
        Row("encoder/embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight",
            "identity", (config.type_vocab_size, D)),
        *_layer_norm("encoder/embeddings/layer_norm", "embeddings.LayerNorm", D),
    ]
    for i in range(config.num_hidden_layers):
        ours, theirs = f"encoder/layer_{i}", f"encoder.layer.{i}"
        rows += [
            *_linear(f"{ours}/attention/query", f"{theirs}.attention.self.query", D, D),
            *_linear(f"{ours}/attention/key", f"{theirs}.attention.self.key", D, D),
            *_linear(f"{ours}/attention/value", f"{theirs}.attention.self.value", D, D),
            *_linear(f"{ours}/attention/output", f"{theirs}.attention.output.dense", D, D),
            *_layer_norm(f"{ours}/attention_norm", f"{theirs}.attention.output.LayerNorm", D),
            *_linear(f"{ours}/intermediate", f"{theirs}.intermediate.dense", D, F),
            *_linear(f"{ours}/output", f"{theirs}.output.dense", F, D),
            *_layer_norm(f"{ours}/output_norm", f"{theirs}.output.LayerNorm", D),
        ]
    rows += _linear("pooler/dense", "pooler.dense", D, D)
    return rows


def dense_table(index: int, dense: DenseConfig) -> list[Row]:
    """The tensors of sentence-transformers' Dense module number `index` (its nn.Linear `linear`),
    paired with `dense_<index>` of our parameters."""
    rows = [Row(f"dense_{index}/kernel", "linear.weight", "transpose", (dense.in_features, dense.out_features))]
    if dense.bias:
        rows.append(Row(f"dense_{index}/bias", "linear.bias", "identity", (dense.out_features,)))
    return rows


def dense_from_torch(state: dict[str, np.ndarray], index: int, dense: DenseConfig, source: str) -> dict:
    """A Dense module's state dict -> our {"dense_<index>": {"kernel", "bias"}} (no bias when it has none)."""
    table = dense_table(index, dense)
    _check_names([r.theirs for r in table], state, source)
    return unflatten(_from_rows(state, table, source))


def dense_to_torch(params: dict, index: int, dense: DenseConfig) -> dict[str, np.ndarray]:
    """Our `dense_<index>` {"kernel", "bias"} -> the Dense module's state dict."""
    flat = {f"dense_{index}/{k}": v for k, v in params.items()}
    return _to_rows(flat, dense_table(index, dense))


def _apply(transform: Transform, array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T) if transform == "transpose" else array


def strip_known_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept `bert.`-prefixed (and similar) checkpoints by removing one common prefix."""
    for prefix in _KNOWN_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _check_names(expected: Iterable[str], found: Iterable[str], what: str, allow_missing=()) -> None:
    expected, found = set(expected), set(found)
    missing = sorted(expected - found - set(allow_missing))
    unexpected = sorted(found - expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected)}")
    if problems:
        raise UserError(f"{what}: {'; '.join(problems)}; the weights do not match config.json")


def from_torch_state(state: dict[str, np.ndarray], config: BertConfig, source: str = "weights") -> dict:
    """PyTorch BertModel names -> our nested weights dict. Fails naming every wrong tensor."""
    state = strip_known_prefix(dict(state))
    table = parameter_table(config)
    _check_names([r.theirs for r in table] + [POSITION_IDS], state, source, allow_missing=(POSITION_IDS,))
    return unflatten(_from_rows(state, table, source))


def _from_rows(state: dict[str, np.ndarray], table: list[Row], source: str) -> dict[str, np.ndarray]:
    bad_shapes = []
    flat = {}
    for row in table:
        array = np.asarray(state[row.theirs])
        theirs_shape = row.shape[::-1] if row.transform == "transpose" else row.shape
        if array.shape != theirs_shape:
            bad_shapes.append(f"{row.theirs} has shape {list(array.shape)}, config.json needs {list(theirs_shape)}")
            continue
        if not np.issubdtype(array.dtype, np.floating):
            bad_shapes.append(f"{row.theirs} has dtype {array.dtype}, expected a float tensor")
            continue
        flat[row.ours] = _apply(row.transform, array)
    if bad_shapes:
        raise UserError(f"{source}: {'; '.join(bad_shapes)}")
    return flat


def to_torch_state(weights: dict, config: BertConfig) -> dict[str, np.ndarray]:
    """Our nested weights dict -> PyTorch BertModel names (plus the position_ids buffer)."""
    flat = flatten({k: weights[k] for k in ("encoder", "pooler") if k in weights})
    state = _to_rows(flat, parameter_table(config))
    state[POSITION_IDS] = np.arange(config.max_position_embeddings, dtype=np.int64)[None, :]
    return state


def _to_rows(flat: dict[str, np.ndarray], table: list[Row]) -> dict[str, np.ndarray]:
    _check_names([r.ours for r in table], flat, "minilm-jax weights")
    state = {}
    for row in table:
        array = np.asarray(flat[row.ours])
        if array.shape != row.shape:
            raise UserError(f"minilm-jax weights: {row.ours} has shape {list(array.shape)}, "
                            f"config.json needs {list(row.shape)}")
        state[row.theirs] = _apply(row.transform, array)
    return state


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
