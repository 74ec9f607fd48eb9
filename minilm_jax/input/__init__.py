"""The training input, below the loop: datasets (spec.py) -> files cut into pieces (sources.py) ->
one shuffled stream per dataset and device (stream.py) -> which dataset each step takes
(schedule.py) -> tokenised, packed device calls on a background thread (pipeline.py).

`open_run_data` checks everything that can be checked before training (files, columns, losses,
weights) and reads no row but what it must count; the rows stream while the run trains.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minilm_jax.errors import UsageError, UserError
from minilm_jax.input.pipeline import DatasetInput, batches_per_epoch, count_rows, open_dataset
from minilm_jax.input.schedule import Schedule
from minilm_jax.input.sources import MemoryReader
from minilm_jax.input.spec import DatasetSpec, build_dataset_loss, dataset_specs
from minilm_jax.pairs import Columns, Pairs

__all__ = ["RunData", "open_run_data", "DatasetSpec", "dataset_specs"]


@dataclasses.dataclass(frozen=True)
class RunData:
    """The run's training datasets, how their steps are laid out, and the evaluation pairs."""

    datasets: tuple[DatasetInput, ...]
    group_losses: tuple  # the loss of each step program (group)
    group_columns: tuple[int, ...]  # its text columns
    group_prompts: tuple[tuple[str, ...], ...]  # its columns' prompts
    no_duplicates: tuple[bool, ...]  # per dataset
    schedule: Schedule
    shard_rows: tuple | None  # per dataset, the rows of every shard, where counted
    eval: Pairs | None
    train_name: str
    eval_name: str | None

    def rows(self, dataset: int) -> int | None:
        return None if self.shard_rows is None else int(sum(self.shard_rows[dataset]))

    @property
    def n_shards(self) -> int:
        return len(self.datasets[0].pieces)


def open_run_data(cfg, model, n_devices: int, local_devices: range) -> RunData:
    """The run's datasets, opened and checked (cfg: a TrainConfig; model: an encode.Model), read as
    --data-shards shards (default: one per device), of which `local_devices` own theirs."""
    from minilm_jax.train_lib import column_prompts, uses_no_duplicates

    specs = dataset_specs(cfg)
    n_shards = cfg.data_shards or n_devices
    if n_shards % n_devices or cfg.batch_size % n_shards:
        raise UsageError(f"--data-shards {n_shards} must be a multiple of the {n_devices} devices and divide "
                         f"--batch-size {cfg.batch_size}; each shard gives batch / shards rows to every step")
    per_device = n_shards // n_devices
    local_shards = range(local_devices.start * per_device, local_devices.stop * per_device)
    groups: dict = {}
    datasets, no_duplicates, losses_ = [], [], []
    eval_pairs = eval_name = None
    for index, spec in enumerate(specs):
        loss = build_dataset_loss(cfg, spec)
        prompts = column_prompts(cfg, model, tuple(spec.columns.texts()))
        key = (spec.loss_name, spec.loss_param, len(spec.columns.texts()), prompts)
        if key not in groups:
            groups[key] = len(groups)
            losses_.append((loss, len(spec.columns.texts()), prompts))
        from minilm_jax.losses import CosineSimilarityLoss

        unit = isinstance(loss, CosineSimilarityLoss)
        if spec.hub:
            ds, eval_pairs = _hub_dataset(cfg, spec, index, groups[key], n_shards, prompts, unit)
            eval_name = f"{spec.hub[0]}{f' ({spec.hub[1]})' if spec.hub[1] else ''} held-out {cfg.eval_fraction:.0%}"
        else:
            ds = open_dataset(spec, index, groups[key], n_shards, score_required=loss.needs_scores,
                              unit_interval=unit, prompts=prompts)
        datasets.append(ds)
        no_duplicates.append(uses_no_duplicates(cfg, loss))
    shard_rows = None
    if (not cfg.max_steps or (len(specs) > 1 and cfg.multi_dataset_sampler != "weighted")
            or all(map(cheap_to_count, datasets))):
        shard_rows = _count(datasets, n_shards, local_shards)
    block = cfg.batch_size // n_shards
    batches = None if shard_rows is None else [batches_per_epoch(r, block) for r in shard_rows]
    schedule = Schedule(cfg.multi_dataset_sampler, [s.weight for s in specs], cfg.seed, batches)
    if cfg.eval_file:
        from minilm_jax.pairs import load_pairs

        eval_pairs = load_pairs(cfg.eval_file, Columns(cfg.sentence1_column, cfg.sentence2_column, cfg.score_column),
                                score_scale=cfg.score_scale)
        eval_name = cfg.eval_file
    train_name = (", ".join(s.name for s in specs) if len(specs) > 1 else
                  (f"{specs[0].hub[0]}" + (f" ({specs[0].hub[1]})" if specs[0].hub[1] else "") if specs[0].hub
                   else ", ".join(specs[0].files)))
    return RunData(tuple(datasets), tuple(loss for loss, _, _ in losses_), tuple(c for _, c, _ in losses_),
                   tuple(p for _, _, p in losses_), tuple(no_duplicates), schedule, shard_rows, eval_pairs,
                   train_name, eval_name)


def cheap_to_count(ds: DatasetInput) -> bool:
    """Rows are counted even where no option needs it (for the epoch in metrics.jsonl and the
    evaluation at each epoch's end) when that takes a fraction of a second: files of up to
    COUNT_BYTES (newlines counted at about 300 MB/s), 64 MB of .csv/.gz (read whole), any parquet."""
    from minilm_jax.input.sources import file_size, is_url

    if ds.memory is not None:
        return True
    total = whole = 0
    for path, layout in ds.layouts.items():
        if layout.fmt.kind != "parquet":
            if is_url(path):
                return False  # counting would fetch the whole file
            size = file_size(path)
            total += size
            whole += 0 if layout.fmt.splittable else size
    return total <= COUNT_BYTES and whole <= 64 << 20 and not ds.spec.positives_only


COUNT_BYTES = 128 << 20  # about 0.4 s of counting (a 363,858-pair Quora file is 45 MB)


def _count(datasets, n_shards: int, local_shards: range) -> tuple:
    """Every dataset's rows in every shard: each host counts its own devices' shards."""
    from minilm_jax.input.hosts import exchange

    mine = {s: [count_rows(ds, [s])[0] for ds in datasets] for s in local_shards}
    every = {int(s): c for part in exchange("rows", {str(s): c for s, c in mine.items()}) for s, c in part.items()}
    rows = tuple(tuple(every[s][i] for s in range(n_shards)) for i in range(len(datasets)))
    for ds, counts in zip(datasets, rows):
        if not sum(counts):
            raise UserError(f"dataset {ds.spec.name} holds no row"
                            + (" labelled 1 (positives_only)" if ds.spec.positives_only else "")
                            + f" ({', '.join(sorted(ds.layouts))}); add at least one pair")
    return rows


def _hub_dataset(cfg, spec: DatasetSpec, index: int, group: int, n_shards: int, prompts, unit: bool):
    """A hub dataset, read whole by `datasets` (it needs network or a warm cache) and split into the
    training rows and the held-out evaluation pairs, as before streaming."""
    from minilm_jax.pairs import load_hub_pairs

    columns = spec.columns
    eval_columns = Columns(columns.sentence1, columns.sentence2, columns.score)
    full = load_hub_pairs(spec.hub[0], spec.hub[1], "train", columns, unit_interval=unit, score_scale=spec.score_scale,
                          score_required=True)
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    n_eval = int(round(len(full) * cfg.eval_fraction))
    train, held_out = full.select(order[n_eval:]), full.select(order[:n_eval])
    if spec.positives_only:
        labels = set(np.unique(train.scores).tolist())
        if not labels <= {0.0, 1.0} or 1.0 not in labels:
            raise UserError(f"--positives-only keeps the rows labelled 1 of a 0/1 pair-class dataset; {spec.hub[0]} has "
                            f"labels {sorted(labels)[:5]}")
        train = train.select(np.flatnonzero(train.scores == 1.0))
    if spec.add_swapped:
        train = train.swapped()
    rows = list(zip(*train.columns(), train.scores.tolist()))
    memory = MemoryReader(rows, spec.name)
    plain = dataclasses.replace(spec, positives_only=False, add_swapped=False)
    ds = DatasetInput(plain, index, group, len(columns.texts()), prompts, memory.layouts, memory.pieces(n_shards),
                      unit, memory)
    eval_pairs = dataclasses.replace(held_out, negatives=()) if eval_columns else held_out
    return ds, eval_pairs
