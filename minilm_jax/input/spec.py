"""The run's named datasets, from the command line or a data-config file: what each one is (files,
columns, weight, loss), checked before anything is read.

A data-config file is JSON, a list of datasets or {"datasets": [...]}; each dataset:

    {"name": "quora", "files": ["data/quora-*.jsonl.gz"], "weight": 3,
     "columns": {"sentence1": "anchor", "sentence2": "positive", "score": "label", "negatives": []},
     "loss": "MultipleNegativesRankingLoss", "loss_param": {"scale": 20},
     "score_scale": 1, "positives_only": false, "add_swapped": false}

Only "name" and "files" are required; the rest defaults to the command line's options (--loss,
--sentence1-column, ...). Relative paths are read from the config file's folder. On the command
line, `--train-file NAME=PATH` names datasets (`--train-file PATH ...` is one dataset) and
`--dataset-weight NAME=W` weighs them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import TYPE_CHECKING

from minilm_jax.errors import UsageError, UserError
from minilm_jax.input.sources import is_url
from minilm_jax.pairs import Columns

if TYPE_CHECKING:
    from minilm_jax.train_config import TrainConfig

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_KEYS = {"name", "files", "weight", "columns", "loss", "loss_param", "score_scale", "positives_only", "add_swapped"}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[str, ...]  # paths and glob patterns
    columns: Columns
    loss_name: str
    loss_param: tuple = ()  # "NAME=VALUE"
    weight: float = 1.0
    score_scale: float = 1.0
    positives_only: bool = False
    add_swapped: bool = False
    hub: tuple | None = None  # (dataset id, subset): a hub dataset instead of files

    def as_dict(self) -> dict:
        return {"name": self.name, "files": list(self.files), "columns": dataclasses.asdict(self.columns),
                "loss": self.loss_name, "loss_param": list(self.loss_param), "weight": self.weight,
                "score_scale": self.score_scale, "positives_only": self.positives_only,
                "add_swapped": self.add_swapped, **({"hub": list(self.hub)} if self.hub else {})}


def build_dataset_loss(cfg: TrainConfig, spec: DatasetSpec):
    """The dataset's loss, with the run's --mini-batch-size and --matryoshka-dims."""
    from minilm_jax.train_config import make_loss

    try:
        return make_loss(spec.loss_name, spec.loss_param, cfg.mini_batch_size, cfg.matryoshka_dims,
                         len(spec.columns.texts()))
    except UsageError as e:
        raise UsageError(f"dataset {spec.name}: {e}") from None


def dataset_specs(cfg: TrainConfig) -> tuple[DatasetSpec, ...]:
    """The run's datasets, each checked: names, weights, columns against its loss."""
    columns = Columns(cfg.sentence1_column, cfg.sentence2_column, cfg.score_column, cfg.negative_column)
    common = dict(columns=columns, loss_name=cfg.loss, loss_param=tuple(cfg.loss_param), score_scale=cfg.score_scale,
                  positives_only=cfg.positives_only, add_swapped=cfg.add_swapped)
    if cfg.data_config:
        specs = _from_config_file(cfg.data_config, common)
    elif cfg.train_file:
        specs = _from_train_files(cfg.train_file, common)
    else:
        from minilm_jax.train_config import DEFAULT_DATASET, DEFAULT_DATASET_SUBSET

        hub = (cfg.dataset, cfg.dataset_subset) if cfg.dataset else (DEFAULT_DATASET, DEFAULT_DATASET_SUBSET)
        if not cfg.dataset and cfg.score_column == "score":  # quora-duplicates pair-class names it 'label'
            common["columns"] = dataclasses.replace(columns, score="label")
        specs = [DatasetSpec(name=hub[0].rsplit("/", 1)[-1], files=(), hub=hub, **common)]
    specs = _weighted(specs, cfg.dataset_weight)
    for spec in specs:
        build_dataset_loss(cfg, spec)
    return tuple(specs)


def _from_train_files(entries, common: dict) -> list[DatasetSpec]:
    named: dict[str, list[str]] = {}
    plain: list[str] = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and _NAME.match(name) and not os.path.exists(entry):
            named.setdefault(name, []).append(path)
        else:
            plain.append(entry)
    if named and plain:
        raise UsageError(f"--train-file mixes named datasets ({', '.join(named)}) with unnamed files ({plain[0]}); "
                         "name every file's dataset (NAME=PATH) or none")
    if plain:
        return [DatasetSpec(name="train", files=tuple(plain), **common)]
    return [DatasetSpec(name=name, files=tuple(paths), **common) for name, paths in named.items()]


def _from_config_file(path: str, common: dict) -> list[DatasetSpec]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--data-config {path} does not exist; check the path") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--data-config {path} is not readable JSON ({e}); see README 'Several datasets'") from None
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"--data-config {path}: expected a list of datasets (or {{\"datasets\": [...]}}) with at least one")
    folder = os.path.dirname(os.path.abspath(path))
    specs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"--data-config {path}, dataset {i + 1}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected an object with \"name\" and \"files\", got {type(entry).__name__}")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(sorted(_KEYS))})")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UsageError(f"{where}: \"name\" must be a word of letters, digits, '_', '-' or '.', got {name!r}")
        if name in names:
            raise UsageError(f"{where}: the name {name!r} is used twice; give each dataset its own name")
        names.add(name)
        where = f"--data-config {path}, dataset {name!r}"
        files = entry.get("files")
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise UsageError(f"{where}: \"files\" must be a path, a glob or a list of them")
        files = tuple(f if os.path.isabs(f) or is_url(f) else os.path.join(folder, f) for f in files)  # URLs as given
        spec = DatasetSpec(name=name, files=files, **{**common, **_options(entry, common, where)})
        specs.append(dataclasses.replace(spec, weight=_weight(entry.get("weight", 1.0), where)))
    return specs


def _options(entry: dict, common: dict, where: str) -> dict:
    out = {}
    if "columns" in entry:
        cols = entry["columns"]
        known = {"sentence1", "sentence2", "score", "negatives"}
        if not isinstance(cols, dict) or set(cols) - known:
            raise UsageError(f"{where}: \"columns\" maps sentence1, sentence2, score and negatives (a list) to "
                             f"column names, got {cols!r}")
        try:
            out["columns"] = dataclasses.replace(common["columns"], **{k: tuple(v) if k == "negatives" else v
                                                                      for k, v in cols.items()})
        except UserError as e:
            raise UsageError(f"{where}: {e}") from None
    if "loss" in entry:
        out["loss_name"] = entry["loss"]
        out["loss_param"] = ()  # the command line's --loss-param belong to --loss
    if "loss_param" in entry:
        params = entry["loss_param"]
        if isinstance(params, dict):
            params = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in params.items()]
        out["loss_param"] = tuple(params)
    if "score_scale" in entry:
        scale = entry["score_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise UsageError(f"{where}: \"score_scale\" must be a positive number, got {scale!r}")
        out["score_scale"] = float(scale)
    for flag in ("positives_only", "add_swapped"):
        if flag in entry:
            if not isinstance(entry[flag], bool):
                raise UsageError(f"{where}: \"{flag}\" must be true or false, got {entry[flag]!r}")
            out[flag] = entry[flag]
    return out


def _weight(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{where}: the weight must be a positive number, got {value!r}; leave a dataset out "
                         "rather than giving it weight 0")
    return float(value)


def _weighted(specs: list[DatasetSpec], weights) -> list[DatasetSpec]:
    by_name = {s.name: s for s in specs}
    for item in weights:
        name, sep, value = item.partition("=")
        if not sep or name not in by_name:
            raise UsageError(f"--dataset-weight {item!r}: give NAME=WEIGHT with a dataset of the run "
                             f"({', '.join(by_name)})")
        try:
            number = float(value)
        except ValueError:
            number = value
        by_name[name] = dataclasses.replace(by_name[name], weight=_weight(number, f"--dataset-weight {item!r}"))
    return [by_name[s.name] for s in specs]

