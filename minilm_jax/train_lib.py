"""Fine-tuning with CosineSimilarityLoss, data-parallel over all devices with `jax.pmap` (plain `jax.jit`
when there is only one).

Sections, in the order the run goes through them: configuration, optimizer, the pure train
step, data, checkpoints, the loop, export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from minilm_jax import data as data_lib
from minilm_jax.config import BertConfig
from minilm_jax.embedding import compute_dtype, packed_sentence_embeddings
from minilm_jax.errors import UsageError, UserError
from minilm_jax.losses import cosine_mse_terms
from minilm_jax.optimizer import AdamW, RowSparse, join_table, split_table
from minilm_jax.pairs import Columns, Pairs, load_hub_pairs, load_pairs
from minilm_jax.run_export import export_run
from minilm_jax.run_folder import (Checkpoints, OutputLock, check_output_dir, check_run_config, read_metrics,
                                   write_text_atomic)

AXIS = "devices"  # the pmap axis name, also given to replicate() so the step compiles once

DEFAULT_DATASET = "sentence-transformers/quora-duplicates"
DEFAULT_DATASET_SUBSET = "pair-class"


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; the defaults are the reference recipe."""

    output_dir: str = "runs/quora"
    model: str | None = None  # None: all-MiniLM-L6-v2
    train_file: str | None = None
    eval_file: str | None = None
    dataset: str | None = None  # a hub dataset; None with no files: the reference's quora-duplicates
    dataset_subset: str | None = None
    eval_fraction: float = 0.1  # held out of a hub dataset that has a single split
    sentence1_column: str = "sentence1"
    sentence2_column: str = "sentence2"
    score_column: str = "score"
    score_scale: float = 1.0  # labels are divided by this (5 for 0-5 STS scores)
    epochs: int = 2
    max_steps: int = 0  # 0: epochs * steps per epoch
    batch_size: int = 16  # global pairs per step, split over devices
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0  # optax's adamw default is 1e-4; the recipe uses 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    dropout: bool = True  # the config's dropout rates (0.1), active in training as in sentence-transformers
    max_seq_length: int = 0  # 0: the model's (256)
    dtype: str = "float32"
    steps_per_dispatch: int = 1  # optimizer steps per device call (lax.scan), to cut per-step overhead
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: only at the end of each epoch
    log_every: int = 100
    eval_batch_size: int = 32

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                    "eval_batch_size", "steps_per_dispatch")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "max_seq_length"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise UsageError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0 or self.score_scale <= 0:
            raise UsageError("--weight-decay must be >= 0, --max-grad-norm and --score-scale > 0")
        if not 0 < self.eval_fraction < 1:
            raise UsageError(f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.dataset and self.train_file:
            raise UsageError("--dataset and --train-file both name the training data; give one of them")
        if self.checkpoint_every % self.steps_per_dispatch:
            raise UsageError(f"--checkpoint-every ({self.checkpoint_every}) must be a multiple of "
                             f"--steps-per-dispatch ({self.steps_per_dispatch}) so that a resumed run replays "
                             "the same dispatches")
        compute_dtype(self.dtype)

    def resumable_fields(self) -> dict:
        """The settings that decide the result; a resumed run must not change them."""
        skip = {"output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batch_size",
                "eval_file"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------- optimizer

def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 (if any), then linear decay to 0 at the last step, as transformers'
    get_linear_schedule_with_warmup."""
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1))
    if not cfg.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, schedule: optax.Schedule) -> AdamW:
    return AdamW(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                 max_grad_norm=cfg.max_grad_norm)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params, tx: AdamW) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# ----------------------------------------------------------------------------- the train step

def train_step(state: TrainState, batch: dict, rng: jax.Array, *, config: BertConfig, tx: AdamW, schedule,
               dtype_name: str = "float32", dropout: bool = True, axis_name: str | None = AXIS):
    """One optimizer step on one device's share of the batch: (state, batch, rng) -> (state, metrics).

    batch: packed ids/positions/segments/slots [R, P] holding the 2b sentences (slots 0..b-1 the
    sentence1 side, b..2b-1 the sentence2 side), labels/weights [b], count []
    (real pairs in the whole global batch). Gradients are averaged over devices with pmean; a step
    whose loss or gradient is not finite is reported in the metrics (`finite`) for the host to stop on.
    """
    # Independent dropout per device; a single device (no axis) draws as device 0 of a pmap would.
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    step_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), device)
    loss, grads = loss_and_grads(state.params, batch, step_rng if dropout else None, config=config,
                                 dtype_name=dtype_name, axis_name=axis_name)
    params, opt_state, grad_norm = tx.apply(grads, state.opt_state, state.params)
    # No in-graph guard against a non-finite step (selecting old or new state costs a third of the
    # optimizer's time on CPU): the host checks every step's metrics before it saves a checkpoint,
    # so a non-finite step stops the run with the last good checkpoint on disk.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, "learning_rate": schedule(state.step), "grad_norm": grad_norm, "finite": finite}
    return new_state, metrics


def loss_and_grads(params, batch: dict, dropout_rng: jax.Array | None, *, config: BertConfig,
                   dtype_name: str = "float32", axis_name: str | None = AXIS):
    """The batch's mean CosineSimilarityLoss and its gradient, averaged over devices. The gradient
    of the word-embedding table is row-sparse (a RowSparse of the rows the batch uses, see
    optimizer.py): the encoder runs on a table of only those rows, with the ids renumbered into it.
    Dropout is on iff a dropout rng is given."""
    n_devices = jax.lax.psum(1, axis_name) if axis_name else 1
    b = batch["labels"].shape[0]
    rows_N, local_ids = batch_rows(batch["ids"], config.vocab_size, axis_name)
    local_config = dataclasses.replace(config, vocab_size=rows_N.shape[0])
    local_batch = {**batch, "ids": local_ids}
    rest, table = split_table(params)
    local_table = table[jnp.minimum(rows_N, config.vocab_size - 1)]  # padding rows: any row, never read

    def loss_fn(local_params):
        emb_2bxD = packed_sentence_embeddings(local_params, local_batch, 2 * b, config=local_config,
                                              dtype=compute_dtype(dtype_name), dropout_rng=dropout_rng)
        terms_b = cosine_mse_terms(emb_2bxD[:b], emb_2bxD[b:], batch["labels"], batch["weights"])
        # This device's share of the global batch mean, scaled so that pmean over devices gives
        # the mean over all real pairs (also for a short last batch with padding rows).
        return jnp.sum(terms_b) / batch["count"] * n_devices

    loss, grads = jax.value_and_grad(loss_fn)(join_table(rest, local_table))
    if axis_name:  # every device has the same rows_N, so the table rows' gradients average too
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    rest_grads, table_grad = split_table(grads)
    return loss, join_table(rest_grads, RowSparse(rows_N, table_grad))


def batch_rows(ids: jax.Array, vocab_size: int, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """The table rows a step's ids use, over all devices: (rows [N], ids renumbered into rows).

    rows are sorted and distinct, padded with vocab_size to N = the number of ids on all devices, so
    that shapes are static and every device holds the same rows in the same order.
    """
    all_ids = jax.lax.all_gather(ids, axis_name) if axis_name else ids
    rows_N = jnp.unique(all_ids.reshape(-1), size=all_ids.size, fill_value=vocab_size)
    return rows_N, jnp.searchsorted(rows_N, ids).astype(ids.dtype)


def train_steps(state: TrainState, batches: dict, rng: jax.Array, **step_kwargs):
    """Several train steps in one device call: `batches` has a leading step axis."""

    def body(carry, batch):
        return train_step(carry, batch, rng, **step_kwargs)

    return jax.lax.scan(body, state, batches)


def compiled_train_steps(n_devices: int, **step_kwargs):
    """`train_steps` compiled for `n_devices` devices in all: (state, batches [local devices, steps, ...],
    rng) -> (state, metrics [local devices, steps]), the state donated and placed by `to_devices`.

    Several devices: jax.pmap over AXIS, gradients averaged with pmean. One device: plain jax.jit
    of the same function, which is the same maths without pmap's copies (16-19% of a CPU step at
    batch 16, bench/RESULTS.md). The device axis of batches and metrics is kept either way, so the
    loop around it does not care which it got.
    """
    if n_devices > 1:
        return jax.pmap(functools.partial(train_steps, **step_kwargs), axis_name=AXIS, in_axes=(0, 0, None),
                        donate_argnums=(0,))

    def one_device(state, batches, rng):
        state, metrics = train_steps(state, jax.tree.map(lambda x: x[0], batches), rng, axis_name=None,
                                     **step_kwargs)
        return state, jax.tree.map(lambda x: x[None], metrics)

    return jax.jit(one_device, donate_argnums=(0,))


def to_devices(tree, n_devices: int):
    """Place `tree` for compiled_train_steps: replicated over the local devices for pmap, or a
    private copy on the one device (the step donates it, and `tree` may be a loaded model's)."""
    if n_devices > 1:
        from flax import jax_utils

        return jax_utils.replicate(tree, axis_name=AXIS)
    return jax.tree.map(jnp.array, tree)


def from_devices(tree, n_devices: int):
    """Host (numpy) copy of a tree placed by `to_devices`: device 0's replica when replicated."""
    if n_devices > 1:
        from flax import jax_utils

        tree = jax_utils.unreplicate(tree)
    return jax.device_get(tree)


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class RunData:
    train: Pairs
    eval: Pairs | None
    train_name: str
    eval_name: str | None


def load_run_data(cfg: TrainConfig) -> RunData:
    columns = Columns(cfg.sentence1_column, cfg.sentence2_column, cfg.score_column)
    if cfg.train_file:
        train = load_pairs(cfg.train_file, columns, unit_interval=True, score_scale=cfg.score_scale)
        train_name = cfg.train_file
        eval_pairs = None
    else:
        name = cfg.dataset or DEFAULT_DATASET
        subset = cfg.dataset_subset if cfg.dataset else DEFAULT_DATASET_SUBSET
        if not cfg.dataset and cfg.score_column == "score":
            columns = dataclasses.replace(columns, score="label")  # quora-duplicates pair-class names it 'label'
        full = load_hub_pairs(name, subset, "train", columns, unit_interval=True, score_scale=cfg.score_scale)
        order = np.random.default_rng(cfg.seed).permutation(len(full))
        n_eval = int(round(len(full) * cfg.eval_fraction))
        train, eval_pairs = full.select(order[n_eval:]), full.select(order[:n_eval])
        train_name = f"{name}" + (f" ({subset})" if subset else "")
    eval_name = None
    if cfg.eval_file:
        eval_pairs = load_pairs(cfg.eval_file, columns, score_scale=cfg.score_scale)
        eval_name = cfg.eval_file
    elif eval_pairs is not None:
        eval_name = f"{train_name} held-out {cfg.eval_fraction:.0%}"
    return RunData(train, eval_pairs, train_name, eval_name)


# ----------------------------------------------------------------------------- the loop

class NonFiniteLoss(UserError):
    pass


def prepare_model(cfg: TrainConfig):
    from minilm_jax.encode import load
    from minilm_jax.tokenizer import Tokenizer
    import tokenizers

    model = load(cfg.model)
    if cfg.max_seq_length:
        if cfg.max_seq_length > model.config.max_position_embeddings:
            raise UsageError(f"--max-seq-length {cfg.max_seq_length} exceeds the model's "
                             f"max_position_embeddings {model.config.max_position_embeddings}")
        backend = tokenizers.Tokenizer.from_str(model.tokenizer.backend.to_str())
        model = model.replace(sentence=dataclasses.replace(model.sentence, max_seq_length=cfg.max_seq_length),
                              tokenizer=Tokenizer(backend, cfg.max_seq_length))
    return model


def train_and_evaluate(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) the training described by `cfg` in cfg.output_dir; export the model at the end.
    Returns the final evaluation metrics (empty without eval data)."""
    cfg.validate()
    out = Path(cfg.output_dir).absolute()
    # Everything that can be wrong with the options, the model or the data fails here, before
    # OUTPUT is created or touched: a failed start leaves no folder behind.
    check_output_dir(out)
    n_global = jax.device_count()
    if cfg.batch_size % n_global:
        raise UsageError(f"--batch-size {cfg.batch_size} is not a multiple of the {n_global} devices; "
                         f"use a multiple of {n_global}")
    if out.is_dir():
        check_run_config(out, cfg, write=False)
    model = prepare_model(cfg)
    run_data = load_run_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # On several hosts sharing one output folder, process 0 owns the folder; the others only
    # take part in the checkpoints.
    lock = OutputLock(out) if jax.process_index() == 0 else None
    try:
        return _run(cfg, out, progress, model, run_data)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: TrainConfig, out: Path, progress: bool, model, run_data: RunData) -> dict:
    from minilm_jax.metrics import evaluate_pairs

    is_main = jax.process_index() == 0
    n_global, n_local = jax.device_count(), jax.local_device_count()
    if is_main:
        check_run_config(out, cfg)  # again, under the lock
        for stale in out.glob(".*.tmp-*"):  # write_text_atomic's leftovers from a killed run (we hold the lock)
            if stale.is_file():
                stale.unlink()
    train_tokens = data_lib.tokenize_pairs(run_data.train, model.tokenizer)
    per_epoch = data_lib.steps_per_epoch(len(train_tokens), cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * per_epoch
    schedule = learning_rate_schedule(cfg, total_steps)
    tx = make_optimizer(cfg, schedule)

    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    state = init_state(model.params, tx)
    if checkpoints.latest_step() is not None:
        state = checkpoints.restore(state)
    start_step = int(state.step)
    metrics_path = out / "metrics.jsonl"
    records = read_metrics(metrics_path, start_step)
    if is_main:
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    layout = data_lib.BatchLayout(cfg.batch_size, n_global, n_local, jax.process_index() * n_local)
    step_fn = compiled_train_steps(n_global, config=model.config, tx=tx, schedule=schedule, dtype_name=cfg.dtype,
                                   dropout=cfg.dropout)
    rng = jax.random.PRNGKey(cfg.seed)
    p_state = to_devices(state, n_global)
    del state

    def evaluate(params) -> dict:
        if run_data.eval is None:
            return {}
        result = evaluate_pairs(model.replace(params=params), run_data.eval, ("cosine",), cfg.eval_batch_size,
                                cfg.dtype)
        return {f"eval_{k}": v for k, v in result.items()}

    log = _Logger(metrics_path if is_main else None, total_steps, start_step, cfg, progress and is_main)
    groups = data_lib.prefetch(data_lib.dispatch_groups(
        train_tokens, layout, cfg.seed, start_step, total_steps, cfg.steps_per_dispatch))
    pending = None
    last_eval: dict = {}  # {step: metrics} of the latest evaluation, reused as the final one

    def settle(item):
        first, n, metrics = item
        host = jax.device_get(metrics)
        for k in range(n):
            step = first + k + 1
            if not bool(host["finite"][0, k]):
                checkpoints.wait()
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {step} (loss {float(host['loss'][0, k])}, grad norm "
                    f"{float(host['grad_norm'][0, k])}); stopped, last good checkpoint: step "
                    f"{checkpoints.latest_step()} in {out / 'checkpoints'}; lower --learning-rate or check the data")
            log.step(step, float(host["loss"][0, k]), float(host["learning_rate"][0, k]),
                     float(host["grad_norm"][0, k]), step / per_epoch)

    def crosses(first: int, n: int, every: int) -> bool:
        return every > 0 and (first + n) // every > first // every

    try:
        for first, n, arrays in groups:
            p_state, metrics = step_fn(p_state, arrays, rng)
            if pending is not None:
                settle(pending)  # the previous dispatch's metrics, fetched while this one runs
            pending = (first, n, metrics)
            end = first + n
            epoch_end = crosses(first, n, per_epoch) or end == total_steps
            if crosses(first, n, cfg.eval_every) or epoch_end or crosses(first, n, cfg.checkpoint_every):
                settle(pending)
                pending = None
                log.pause()
                if crosses(first, n, cfg.eval_every) or epoch_end:
                    last_eval = {end: evaluate(from_devices(p_state.params, n_global))}
                    log.eval(end, end / per_epoch, last_eval[end])
                if crosses(first, n, cfg.checkpoint_every) or end == total_steps:
                    checkpoints.save(from_devices(p_state, n_global))
                log.resume()
        if pending is not None:
            settle(pending)
        checkpoints.wait()
    finally:
        log.close()
        checkpoints.wait()
    final_params = from_devices(p_state.params, n_global)
    final_eval = last_eval[total_steps] if total_steps in last_eval else evaluate(final_params)
    if is_main:
        export_run(cfg, out, model.replace(params=final_params), run_data, train_tokens, final_eval, total_steps,
                per_epoch, n_global)
    checkpoints.close()
    return {k.removeprefix("eval_"): v for k, v in final_eval.items()}


class _Logger:
    """Progress bar, and one metrics.jsonl record per log interval (plus one per evaluation).

    pairs_per_second counts only the time spent training: the first dispatch (compilation) and
    evaluations/checkpoints are left out."""

    def __init__(self, path: Path | None, total: int, start: int, cfg: TrainConfig, progress: bool):
        self.path, self.cfg = path, cfg
        self.losses, self.grad_norms = [], []
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.clock = None  # starts after the first settled step, so compilation is not timed
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, epoch: float) -> None:
        now = time.perf_counter()
        if self.clock is not None:
            self.timed_steps += 1
            self.timed_seconds += now - self.clock
        self.clock = now
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step % self.cfg.log_every == 0:
                self.bar.set_postfix(loss=f"{np.mean(self.losses[-10:]):.4f}", lr=f"{lr:.2e}",
                                     pairs_s=f"{self.rate():.1f}")
        if step % self.cfg.log_every == 0:
            self.write({"step": step, "epoch": round(epoch, 4), "loss": float(np.mean(self.losses)),
                        "learning_rate": lr, "grad_norm": float(np.mean(self.grad_norms)),
                        "pairs_per_second": self.rate()})
            self.losses, self.grad_norms = [], []
            self.timed_steps, self.timed_seconds = 0, 0.0

    def rate(self) -> float | None:
        if not self.timed_steps:
            return None
        return round(self.timed_steps * self.cfg.batch_size / self.timed_seconds, 2)

    def eval(self, step: int, epoch: float, metrics: dict) -> None:
        if metrics:
            self.write({"step": step, "epoch": round(epoch, 4), **metrics})
            if self.bar is not None:
                self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def pause(self) -> None:
        self.clock = None

    def resume(self) -> None:
        self.clock = time.perf_counter()

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


