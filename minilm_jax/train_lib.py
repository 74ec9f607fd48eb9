"""Fine-tuning a sentence model, data-parallel over all devices with `jax.pmap` (plain `jax.jit`
when there is only one): the configuration, the run's data, and the loop.

The train step and its two compiled programs are in train_step.py; the run folder's bookkeeping
(lock, config check, metrics, checkpoints) in run_folder.py; the export at the end in run_export.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import data as data_lib, losses
from minilm_jax.ahead_of_time import AheadOfTime
from minilm_jax.embedding import compute_dtype
from minilm_jax.errors import Stopped, UsageError, UserError
from minilm_jax.optimizer import AdamW
from minilm_jax.preemption import StopAgreement, StopSignals
from minilm_jax.pairs import Columns, Pairs, load_hub_pairs, load_pairs
from minilm_jax.run_export import export_run
from minilm_jax.run_folder import (Checkpoints, OutputLock, check_output_dir, check_run_config, read_metrics,
                                   write_failed, write_text_atomic)
from minilm_jax.trained_rows import TrainedRows
from minilm_jax.train_step import (StepSpec, TrainState, from_devices, init_host_state, init_state, step_program,
                                   to_devices)

BATCH_SAMPLERS = ("auto", "shuffle", "no-duplicates")
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
    packed_tokens: int = 0  # tokens per device in the fast packed shape; 0: data.TOKENS_PER_SENTENCE per sentence
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 0  # 0: only at the end of each epoch
    log_every: int = 100
    eval_batch_size: int = 32
    evaluator: tuple = ("similarity",)  # evaluators.EVALUATORS names, run on the eval data
    loss: str = "CosineSimilarityLoss"  # a losses.BY_NAME name (sentence-transformers' class name)
    loss_param: tuple = ()  # "NAME=VALUE" constructor parameters of the loss, sentence-transformers' names
    mini_batch_size: int = 0  # Cached* losses: sentences per micro-batch; 0: the loss's default (32)
    matryoshka_dims: tuple = ()  # wrap the loss in MatryoshkaLoss over these dimensions
    negative_column: tuple = ()  # hard-negative text columns of the training data
    positives_only: bool = False  # keep the label-1 rows of a 0/1 pair-class file (for in-batch negatives)
    add_swapped: bool = False  # also train on every row swapped: (sentence2, sentence1)
    batch_sampler: str = "auto"  # shuffle, no-duplicates; auto: no-duplicates for in-batch-negative losses
    # sentence-transformers' `prompts` training argument: "TEXT" (every column) or "COLUMN=TEXT"
    # entries; a model's prompt can be named as "COLUMN=@NAME" (or "@NAME")
    prompt: tuple = ()

    def __post_init__(self):
        for name in ("evaluator", "loss_param", "matryoshka_dims", "negative_column", "prompt"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # a command line gives lists

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every",
                    "eval_batch_size", "steps_per_dispatch")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "max_seq_length", "packed_tokens"):
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
        from minilm_jax.evaluators import EVALUATORS

        if self.batch_sampler not in BATCH_SAMPLERS:
            raise UsageError(f"--batch-sampler must be one of {', '.join(BATCH_SAMPLERS)}, got {self.batch_sampler!r}")
        if self.mini_batch_size < 0:
            raise UsageError(f"--mini-batch-size must be 0 or more, got {self.mini_batch_size}")
        build_loss(self)
        unknown = [name for name in self.evaluator if name not in EVALUATORS]
        if unknown or not self.evaluator or len(set(self.evaluator)) != len(self.evaluator):
            raise UsageError(f"--evaluator takes distinct names of {', '.join(EVALUATORS)}; got {' '.join(self.evaluator)}")

    def resumable_fields(self) -> dict:
        """The settings that decide the result; a resumed run must not change them."""
        skip = {"output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batch_size",
                "evaluator",
                "eval_file"}
        if not self.prompt:  # so that a run written before --prompt existed still resumes
            skip.add("prompt")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


# ----------------------------------------------------------------------------- optimizer and loss

def learning_rate_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 (if any), then linear decay to 0 at the last step, as transformers'
    get_linear_schedule_with_warmup."""
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1))
    if not cfg.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def learning_rates(cfg: TrainConfig, total_steps: int) -> np.ndarray:
    """The learning rate of every step (float32 [total_steps]), computed on the host and fed to the
    compiled step as an input, so that the schedule and the step count are not constants of it.

    These are learning_rate_schedule's values as JAX computes them, bit for bit
    (tests/test_train_outputs.py), in numpy: evaluating the schedule with JAX cost a run's start
    about a second of small compilations beside the train programs'."""
    step = np.arange(total_steps, dtype=np.int32)

    def linear(init: float, end: float, transition: int, count: np.ndarray) -> np.ndarray:
        # optax.polynomial_schedule at power 1: (init - end) * (1 - clip(count) / transition) + end,
        # op by op in float32; XLA divides by the constant `transition` as a product with its
        # float32 reciprocal, and so does this.
        reciprocal = np.float32(1) / np.float32(transition)
        frac = np.float32(1) - np.clip(count, 0, transition).astype(np.float32) * reciprocal
        return np.float32(init - end) * frac + np.float32(end)

    decay = linear(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1), step - cfg.warmup_steps)
    if not cfg.warmup_steps:
        return decay
    return np.where(step < cfg.warmup_steps, linear(0.0, cfg.learning_rate, cfg.warmup_steps, step), decay)


def make_optimizer(cfg: TrainConfig) -> AdamW:
    return AdamW(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                 max_grad_norm=cfg.max_grad_norm)


def step_spec(cfg: TrainConfig, model, n_devices: int) -> StepSpec:
    """What the compiled train step depends on: all of it known from the options and the model."""
    loss = build_loss(cfg)
    shapes = data_lib.step_shapes(cfg.batch_size // n_devices, 2 + len(cfg.negative_column),
                                  model.sentence.max_seq_length, cfg.packed_tokens,
                                  mini_batch_size=getattr(loss, "mini_batch_size", None))
    prompt_lengths = ()
    if not model.sentence.include_prompt and any(column_prompts(cfg, model)):
        from minilm_jax.encode import prompt_length

        prompt_lengths = tuple(prompt_length(model, p) if p else 0 for p in column_prompts(cfg, model))
    return StepSpec(model.config, loss, shapes, cfg.dtype, cfg.dropout, head=model.sentence.head,
                    prompt_lengths=prompt_lengths)


def column_names(cfg: TrainConfig) -> tuple[str, ...]:
    """The training data's text columns, in the order the train step lays them out."""
    return (cfg.sentence1_column, cfg.sentence2_column, *cfg.negative_column)


def column_prompts(cfg: TrainConfig, model) -> tuple[str, ...]:
    """The prompt of each text column ("" for none), from --prompt: "TEXT" for every column,
    "COLUMN=TEXT" for one; "@NAME" (or "COLUMN=@NAME") for the model's prompt NAME."""
    names = column_names(cfg)
    out = ["" for _ in names]
    for entry in cfg.prompt:
        column, sep, text = entry.partition("=")
        if sep and column in names:
            targets = [names.index(column)]
        elif sep and column.isidentifier():
            raise UsageError(f"--prompt {entry!r}: {column!r} is not a text column of the training data "
                             f"({', '.join(names)}); write COLUMN=TEXT, or TEXT alone for every column")
        else:
            targets, text = list(range(len(names))), entry
        if text.startswith("@"):
            prompts = model.sentence.prompt_dict
            if text[1:] not in prompts:
                raise UsageError(f"--prompt {entry!r}: the model has no prompt named {text[1:]!r} "
                                 f"({', '.join(prompts) or 'it has no prompts'})")
            text = prompts[text[1:]]
        for i in targets:
            out[i] = text
    return tuple(out)


def batch_plan(cfg: TrainConfig, train: Pairs, loss) -> data_lib.BatchPlan:
    """The rows of every step: shuffled, or with no text twice in a batch (sentence-transformers'
    NO_DUPLICATES, for in-batch negatives, where a repeated text is a false negative)."""
    from minilm_jax.sampler import text_ids

    no_duplicates = cfg.batch_sampler == "no-duplicates" or (cfg.batch_sampler == "auto" and in_batch_negatives(loss))
    return data_lib.BatchPlan(len(train), cfg.batch_size, cfg.seed,
                              text_ids(train.columns()) if no_duplicates else None)


def in_batch_negatives(loss) -> bool:
    """The MultipleNegatives losses: the other rows of the batch are the negatives (they take no
    scores)."""
    return not loss.needs_scores


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class RunData:
    train: Pairs
    eval: Pairs | None
    train_name: str
    eval_name: str | None


def load_run_data(cfg: TrainConfig, loss=None) -> RunData:
    """The training rows (sentence1, sentence2, any --negative-column texts, scores as `loss`
    needs them) and the evaluation pairs."""
    loss = loss or build_loss(cfg)
    eval_columns = Columns(cfg.sentence1_column, cfg.sentence2_column, cfg.score_column)
    columns = dataclasses.replace(eval_columns, negatives=cfg.negative_column)
    # CosineSimilarityLoss regresses cos(u, v) onto the label: it needs labels in [0, 1].
    options = dict(unit_interval=isinstance(loss, losses.CosineSimilarityLoss), score_scale=cfg.score_scale,
                   score_required=loss.needs_scores)
    if cfg.train_file:
        train = load_pairs(cfg.train_file, columns, **options, positives_only=cfg.positives_only,
                           add_swapped=cfg.add_swapped)
        train_name = cfg.train_file
        eval_pairs = None
    else:
        name = cfg.dataset or DEFAULT_DATASET
        subset = cfg.dataset_subset if cfg.dataset else DEFAULT_DATASET_SUBSET
        if not cfg.dataset and cfg.score_column == "score":
            # quora-duplicates pair-class names it 'label'
            columns = dataclasses.replace(columns, score="label")
            eval_columns = dataclasses.replace(eval_columns, score="label")
        full = load_hub_pairs(name, subset, "train", columns, **{**options, "score_required": True})
        order = np.random.default_rng(cfg.seed).permutation(len(full))
        n_eval = int(round(len(full) * cfg.eval_fraction))
        train, eval_pairs = full.select(order[n_eval:]), full.select(order[:n_eval])
        train = _training_rows(train, cfg, f"{name} ({subset})" if subset else name)
        train_name = f"{name}" + (f" ({subset})" if subset else "")
    eval_name = None
    if cfg.eval_file:
        eval_pairs = load_pairs(cfg.eval_file, eval_columns, score_scale=cfg.score_scale)
        eval_name = cfg.eval_file
    elif eval_pairs is not None:
        eval_name = f"{train_name} held-out {cfg.eval_fraction:.0%}"
    losses.check_columns(loss, len(train.columns()))
    return RunData(train, eval_pairs, train_name, eval_name)


def _training_rows(pairs: Pairs, cfg: TrainConfig, source: str) -> Pairs:
    """--positives-only and --add-swapped on rows already read (the hub's split is made first, so
    that the held-out evaluation keeps both labels)."""
    if cfg.positives_only:
        labels = set(np.unique(pairs.scores).tolist())
        if not labels <= {0.0, 1.0} or 1.0 not in labels:
            raise UserError(f"--positives-only keeps the rows labelled 1 of a 0/1 pair-class dataset; {source} has "
                            f"labels {sorted(labels)[:5]}")
        pairs = pairs.select(np.flatnonzero(pairs.scores == 1.0))
    return pairs.swapped() if cfg.add_swapped else pairs


def build_loss(cfg: TrainConfig):
    """The losses.* loss of --loss, with --loss-param, --mini-batch-size and --matryoshka-dims."""
    cls = losses.BY_NAME.get(cfg.loss)
    if cls is None or cls is losses.MatryoshkaLoss:
        names = [n for n in losses.BY_NAME if n != "MatryoshkaLoss"]
        raise UsageError(f"--loss {cfg.loss!r} is not one of {', '.join(names)} (MatryoshkaLoss: add "
                         "--matryoshka-dims to any of them)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = {}
    for item in cfg.loss_param:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "mini_batch_size":
            known = ", ".join(k for k in fields if k != "mini_batch_size") or "none"
            raise UsageError(f"--loss-param {item!r}: give NAME=VALUE with a parameter of {cls.name} ({known})")
        params[key] = _parse_param(cls.name, key, value, fields[key].default)
    if cfg.mini_batch_size:
        if "mini_batch_size" not in fields:
            raise UsageError(f"--mini-batch-size is for the Cached* losses (GradCache), not {cls.name}")
        params["mini_batch_size"] = cfg.mini_batch_size
    try:
        loss = cls(**params)
        if cfg.matryoshka_dims:
            loss = losses.MatryoshkaLoss(loss, cfg.matryoshka_dims)
        losses.check_columns(loss, 2 + len(cfg.negative_column))
    except UserError as e:  # a loss's settings are options: a usage error
        raise UsageError(str(e)) from None
    return loss


def _parse_param(loss_name: str, key: str, value: str, default):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        if isinstance(default, (int, float)):
            return type(default)(value)
        if isinstance(default, tuple):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return None if value.lower() == "none" else value
    except ValueError:
        raise UsageError(f"--loss-param {key}={value}: {loss_name}'s {key} takes a {type(default).__name__} "
                         f"(default {default!r})") from None


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


def train_and_evaluate(cfg: TrainConfig, progress: bool = True, signals: StopSignals | None = None) -> dict:
    """Run (or resume) the training described by `cfg` in cfg.output_dir; export the model at the end.
    Returns the final evaluation metrics (empty without eval data), and what compilation cost.

    SIGTERM, SIGINT and SIGUSR1 stop the run after the dispatch in flight, with a checkpoint, by
    raising errors.Stopped (preemption.py); `signals`: handlers already installed by the caller
    (train.py installs them first thing), else they are installed here, in the main thread only."""
    if signals is None:
        with StopSignals() as own:
            return train_and_evaluate(cfg, progress, own)
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
    spec = step_spec(cfg, model, n_global)
    # The programs' shapes follow from the options, the model and the rows of the word-embedding
    # table the data uses: compile them while the rest of the run is prepared.
    # Two threads: the general program (which the first steps of a run usually need, see
    # data.TOKENS_PER_SENTENCE) compiles beside the fast one rather than after it.
    compiler, stopped = AheadOfTime(threads=2), False
    try:
        run_data = load_run_data(cfg, spec.loss)
        steps = _plan_steps(cfg, run_data, model, spec.loss)
        trained = steps.rows.train_params(model.params)
        programs = TrainPrograms(spec, cfg.steps_per_dispatch, compiler,
                                 jax.eval_shape(lambda: init_state(trained, make_optimizer(cfg))),
                                 tokens=steps.tokens, plan=steps.plan, total_steps=steps.total,
                                 batch_size=cfg.batch_size)
        programs.prepare(spec.shapes.programs[0])
        if not (out / "checkpoints").is_dir():
            # A new run starts at step 0, so whether it needs the general program is known now:
            # start compiling it here rather than after the checkpoints are opened (a cold run's
            # first general step waited for it).
            programs.general_steps(0)
        evaluators = build_evaluators(cfg, run_data, model.sentence.similarity_fn_name)
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock_output(out)
        try:
            return _run(cfg, out, progress, model, run_data, steps, programs, evaluators, signals)
        finally:
            if lock is not None:
                lock.release()
    except Stopped:
        stopped = True  # a program still compiling (the general one, the evaluation's) is not needed
        raise
    finally:
        compiler.close(wait=not stopped)


def _lock_output(out: Path) -> OutputLock | None:
    """On several hosts sharing one output folder, process 0 owns the folder (the others only take part in
    the checkpoints): it takes the lock, and every process learns whether it could, at a barrier, so that
    each one ends with the same error line rather than as a lost peer of process 0."""
    if jax.process_count() == 1:
        return OutputLock(out)
    from jax._src import distributed as jax_distributed  # the runtime client: no public accessor

    from minilm_jax.distributed import barrier_seconds

    client, key = jax_distributed.global_state.client, "minilm_jax/output_lock"
    lock, refused = None, ""
    if jax.process_index() == 0:
        try:
            lock = OutputLock(out)
        except UserError as e:
            refused = str(e)
        client.key_value_set(key, "refused " + refused if refused else "locked")
    answer = client.blocking_key_value_get(key, barrier_seconds() * 1000)
    client.wait_at_barrier(key, barrier_seconds() * 1000)  # process 0 leaves only after every process has read it
    if answer.startswith("refused "):
        refused = UserError(answer.removeprefix("refused "))
        refused.every_process = True
        raise refused
    return lock


class TrainPrograms:
    """The run's two train programs (train_step.py), compiled ahead of time by `compiler`.

    Which steps need the general program, and whether it needs GradCache's loop, is decided from
    the whole run's plan (steps 0 to total_steps of `plan` over `tokens`), whatever step a resumed
    run starts at, so that a resumed run compiles the programs the run began with."""

    def __init__(self, spec: StepSpec, steps_per_dispatch: int, compiler: AheadOfTime, example_state: TrainState, *,
                 tokens: data_lib.TokenizedPairs, plan: data_lib.BatchPlan, total_steps: int, batch_size: int):
        self.spec, self.steps_per_dispatch, self.compiler = spec, steps_per_dispatch, compiler
        self.tokens, self.plan, self.total_steps, self.batch_size = tokens, plan, total_steps, batch_size
        self.n_global, self.n_local = jax.device_count(), jax.local_device_count()
        state = jax.eval_shape(lambda s: s, example_state)  # shapes only (arrays or ShapeDtypeStructs)
        if self.n_global > 1:  # replicated: a leading axis of local devices
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((self.n_local, *x.shape), x.dtype), state)
        if jax.process_count() > 1:
            # pmap over several processes turns every argument into a global array with np.asarray,
            # which takes no ShapeDtypeStruct: lower it for zeros (broadcast views, no memory).
            state = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), state)
        self._example_state = state
        self._run_general: dict[int, int] | None = None  # the run's general steps: their micro-batches

    def _general_of_run(self) -> dict[int, int]:
        if self._run_general is None:
            layout = data_lib.BatchLayout(self.batch_size, self.n_global, self.n_local,
                                          jax.process_index() * self.n_local)
            self._run_general = data_lib.general_steps(self.tokens, layout, self.spec.shapes, self.plan, 0,
                                                       self.total_steps)
        return self._run_general

    @functools.cached_property
    def _general_spec(self) -> StepSpec:
        return dataclasses.replace(self.spec, gradcache=max(self._general_of_run().values(), default=0) > 1)

    def spec_of(self, program: str) -> StepSpec:
        """The StepSpec `program` is compiled for: the general program holds GradCache's loop only if
        some step of the run needs several micro-batches."""
        return self._general_spec if program == "general" else self.spec

    def prepare(self, program: str) -> None:
        """Start compiling `program` (if not yet started)."""
        if self.compiler.submitted(program):
            return
        batches = data_lib.example_dispatch(self.spec.shapes, self.n_local, self.steps_per_dispatch, program)
        batches["learning_rate"] = np.zeros((self.n_local, self.steps_per_dispatch), np.float32)
        rng = np.zeros((2,), np.uint32)
        self.compiler.submit(program, step_program(self.spec_of(program), program, self.n_global),
                             self._example_state, batches, rng, make_optimizer(TrainConfig()).as_inputs(),
                             call_compiled=jax.process_count() == 1)

    def get(self, program: str):
        self.prepare(program)
        return self.compiler.get(program)

    def general_steps(self, start_step: int) -> list[int]:
        """The steps of [start_step, the run's end) that need the general program; it starts
        compiling if there are any, or if the last dispatch is short (padded in the general program)."""
        general = [s for s in self._general_of_run() if s >= start_step]
        if general or (self.total_steps - start_step) % self.steps_per_dispatch:
            self.prepare("general")
        return general

    def check(self, dispatch: data_lib.Dispatch) -> None:
        """A general program compiled without GradCache's loop must never get a step that needs it:
        the plan it was decided from says none does."""
        if dispatch.program == "general" and not self._general_spec.gradcache:
            most = int(np.max(dispatch.arrays["general"]["micro_batches"]))
            if most > 1:
                raise RuntimeError(f"steps {dispatch.first}-{dispatch.first + dispatch.n - 1} need {most} micro-batches, "
                                   "but the general program was compiled for one: the run's plan and its batches disagree")


def with_learning_rates(dispatch: data_lib.Dispatch, rates: np.ndarray, steps_per_dispatch: int) -> dict:
    """The dispatch's arrays and its steps' learning rates ([local devices, steps]; 0 for padding)."""
    step_rates = np.zeros(steps_per_dispatch, np.float32)
    step_rates[:dispatch.n] = rates[dispatch.first:dispatch.first + dispatch.n]
    n_local = jax.tree.leaves(dispatch.arrays)[0].shape[0]
    return {**dispatch.arrays, "learning_rate": np.broadcast_to(step_rates, (n_local, steps_per_dispatch))}


@dataclasses.dataclass(frozen=True)
class _PlannedSteps:
    tokens: data_lib.TokenizedPairs  # the training rows, tokenised
    rows: TrainedRows  # the word-embedding rows they use, which the train state holds
    plan: data_lib.BatchPlan
    total: int  # the run's steps


def _plan_steps(cfg: TrainConfig, run_data: RunData, model, loss) -> _PlannedSteps:
    plan = batch_plan(cfg, run_data.train, loss)
    tokens = data_lib.tokenize_pairs(run_data.train, model.tokenizer, column_prompts(cfg, model))
    rows = TrainedRows.for_data(tokens, model.config.vocab_size, cfg.weight_decay)
    return _PlannedSteps(tokens, rows, plan, cfg.max_steps or plan.epoch_start(cfg.epochs))


def build_evaluators(cfg: TrainConfig, run_data: RunData, model_similarity: str = "cosine") -> list:
    """The evaluators of the run, checked against its eval data before anything is written; they
    score with the model's similarity function, as sentence-transformers' evaluators do by default."""
    from minilm_jax.evaluators import build_evaluator

    if run_data.eval is None:
        return []
    return [build_evaluator(name, pairs=run_data.eval, model_similarity=model_similarity) for name in cfg.evaluator]


def _run(cfg: TrainConfig, out: Path, progress: bool, model, run_data: RunData, steps: _PlannedSteps,
         programs: TrainPrograms, evaluators: list, signals: StopSignals) -> dict:
    is_main = jax.process_index() == 0
    n_global, n_local = jax.device_count(), jax.local_device_count()
    if is_main:
        check_run_config(out, cfg)  # again, under the lock
        for stale in out.glob(".*.tmp-*"):  # write_text_atomic's leftovers from a killed run (we hold the lock)
            if stale.is_file():
                stale.unlink()
    train_tokens, plan, total_steps = steps.tokens, steps.plan, steps.total
    rates = learning_rates(cfg, total_steps)
    tx = make_optimizer(cfg)

    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    rows = steps.rows
    if checkpoints.latest_step() is not None:
        state = jax.device_get(checkpoints.restore(init_state(model.params, tx)))
        untrained = state.params  # where the rows the run does not train come from
        state = rows.train_state(state)
    else:
        untrained = model.params
        state = init_host_state(rows.train_params(model.params), tx)
    start_step = int(state.step)
    metrics_path = out / "metrics.jsonl"
    records = read_metrics(metrics_path, start_step)
    if is_main:
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    layout = data_lib.BatchLayout(cfg.batch_size, n_global, n_local, jax.process_index() * n_local)
    shapes = programs.spec.shapes
    general = programs.general_steps(start_step)  # compiled while the first fast steps run
    if evaluators:  # the evaluation's programs too: after the train programs, before the first evaluation
        from minilm_jax.encode import warm_up

        calls = [texts for ev in evaluators for texts in ev.encode_calls()]
        programs.compiler.run("evaluation", lambda: warm_up(calls, model, cfg.eval_batch_size, dtype=cfg.dtype))
    rng = jax.random.PRNGKey(cfg.seed)
    tx_inputs = tx.as_inputs()
    p_state = to_devices(state, n_global)
    del state

    def evaluate(params) -> list:
        """[(evaluator, its metrics)], sentence-transformers' keys."""
        if programs.compiler.submitted("evaluation"):
            programs.compiler.get("evaluation")  # its programs, not compiled twice by both threads
        scored = model.replace(params=params)
        return [(ev, ev.evaluate(scored, cfg.eval_batch_size, cfg.dtype)) for ev in evaluators]

    log = _Logger(metrics_path if is_main else None, total_steps, start_step, cfg, progress and is_main,
                  programs.compiler)
    groups = data_lib.prefetch(data_lib.dispatch_groups(
        rows.renumber(train_tokens), layout, shapes, plan, start_step, total_steps, cfg.steps_per_dispatch))
    pending = None
    stop = StopAgreement.for_run(signals)
    stopped_at = None  # the step a stop signal ended the training at
    done = saved = start_step  # steps dispatched; the step of the latest checkpoint (or the run's start)
    last_eval: dict = {}  # {step: [(evaluator, metrics)]} of the latest evaluation, reused as the final one

    def settle(item):
        first, n, metrics = item
        host = jax.device_get(metrics)
        log.dispatch(n)
        for k in range(n):
            step = first + k + 1
            if not bool(host["finite"][0, k]):
                checkpoints.wait()
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {step} (loss {float(host['loss'][0, k])}, grad norm "
                    f"{float(host['grad_norm'][0, k])}); stopped, last good checkpoint: step "
                    f"{checkpoints.latest_step()} in {out / 'checkpoints'}; lower --learning-rate or check the data")
            log.step(step, float(host["loss"][0, k]), float(host["learning_rate"][0, k]),
                     float(host["grad_norm"][0, k]), plan.epoch_of(step))

    def crosses(first: int, n: int, every: int) -> bool:
        return every > 0 and (first + n) // every > first // every

    signals.training_began()  # a stop signal from here on is answered with a checkpoint
    try:
        for boundary, dispatch in enumerate(groups):
            if stop.stop_here(boundary):
                stopped_at = done
                break
            first, n = dispatch.first, dispatch.n
            programs.check(dispatch)
            if not programs.compiler.ready(dispatch.program):
                log.pause()  # waiting for a compile is not training time
                programs.prepare(dispatch.program)
                if stop.while_waiting(lambda: programs.compiler.ready(dispatch.program)):
                    stopped_at = done  # a compile can take a minute: not worth waiting for
                    break
                step_fn = programs.get(dispatch.program)
                log.resume()
            else:
                step_fn = programs.get(dispatch.program)
            if first == start_step:
                checkpoints.import_soon()  # while the first dispatch runs, not at the first checkpoint
            p_state, metrics = step_fn(p_state, with_learning_rates(dispatch, rates, cfg.steps_per_dispatch), rng,
                                       tx_inputs)
            if pending is not None:
                # The previous dispatch's metrics: fetched while this one runs where dispatch is
                # asynchronous (not a single CPU device: host_memory.py).
                settle(pending)
            pending = (first, n, metrics)
            end = done = first + n
            epoch_end = plan.ends_epoch(first, n) or end == total_steps
            if crosses(first, n, cfg.eval_every) or epoch_end or crosses(first, n, cfg.checkpoint_every):
                settle(pending)
                pending = None
                log.pause()
                if crosses(first, n, cfg.eval_every) or epoch_end:
                    last_eval = {end: evaluate(rows.full_params(from_devices(p_state.params, n_global), untrained))}
                    log.eval(end, plan.epoch_of(end), last_eval[end])
                if crosses(first, n, cfg.checkpoint_every) or end == total_steps:
                    saved = end
                    checkpoints.save(rows.full_state(from_devices(p_state, n_global), untrained))
                log.resume()
        if pending is not None:
            settle(pending)
        groups.close()  # its batch thread, when a stop left batches unused
        if stopped_at is None and stop.stop_after_loop(_barrier_seconds()):
            stopped_at = done  # whose checkpoint the loop has started
        if stopped_at is not None:
            seconds = _stop_checkpoint(checkpoints, lambda: rows.full_state(from_devices(p_state, n_global), untrained),
                                       stopped_at != saved)
    except BaseException as e:
        if isinstance(e, Exception) and jax.process_count() > 1:
            # a lost peer: stop now, before the wait below blocks on it
            from minilm_jax import distributed

            distributed.exit_on_peer_failure(e)
        checkpoints.wait()  # no checkpoint left half-written by a run that stops here
        raise
    finally:
        log.close()
    if stopped_at is not None:
        latest = checkpoints.latest_step()
        checkpoints.close()
        where = (f"the checkpoint of step {latest} is in {out / 'checkpoints'} (complete {seconds:.1f} s after the "
                 "stop)" if latest else "no checkpoint yet (the run had not trained a step)")
        again = ("run the same command on every host again" if jax.process_count() > 1 else "run the same command again")
        raise Stopped(f"{stop.cause} at step {stopped_at} of {total_steps}: {where}; {again} to "
                      + (f"resume from step {latest}" if latest else "start"))
    # The last checkpoint is written in the background while the model is evaluated and exported
    # (a kill before it is complete leaves the one before it, which a rerun resumes from).
    try:
        final_params = rows.full_params(from_devices(p_state.params, n_global), untrained)
        final_eval = last_eval[total_steps] if total_steps in last_eval else evaluate(final_params)
        run_report = {**programs.compiler.report(), "general_steps": len(general), "steps": total_steps - start_step}
        if is_main:
            export_run(cfg, out, model.replace(params=final_params), run_data, train_tokens, final_eval, total_steps,
                       n_global, programs.spec.loss)
    finally:
        checkpoints.wait()
    checkpoints.close()
    return {**{k: v for _, metrics in final_eval for k, v in metrics.items()}, **run_report}


def _barrier_seconds() -> int:
    from minilm_jax import distributed

    return distributed.barrier_seconds()


def _stop_checkpoint(checkpoints: Checkpoints, state, write: bool) -> float:
    """Write the checkpoint of `state()` if `write` (not when the run resumed at this step or the loop
    has started its checkpoint), and wait until every checkpoint is complete; the seconds it took."""
    began = time.perf_counter()
    if write:
        checkpoints.save(state())
    checkpoints.wait()
    return time.perf_counter() - began


class _Logger:
    """Progress bar, and one metrics.jsonl record per log interval (plus one per evaluation).

    pairs_per_second counts only the time spent training: the first dispatch, waiting for a
    program to compile, and evaluations/checkpoints are left out. Each record also gives what this
    process has spent on compiling its train programs so far (AheadOfTime.report)."""

    def __init__(self, path: Path | None, total: int, start: int, cfg: TrainConfig, progress: bool,
                 compiler: AheadOfTime):
        self.path, self.cfg, self.compiler = path, cfg, compiler
        self.losses, self.grad_norms = [], []
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.clock = None  # starts after the first settled dispatch, so compilation is not timed
        self.share = None  # seconds per step of the dispatch being settled (None: not timed)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def dispatch(self, n: int) -> None:
        """A dispatch of n steps has settled: its time since the previous one, shared evenly by its
        steps (they arrive together, so timing each step on arrival would give all the time to the
        first and none to the others, and a log interval inside a dispatch would read ~0 s)."""
        now = time.perf_counter()
        self.share = None if self.clock is None else (now - self.clock) / n
        self.clock = now

    def step(self, step: int, loss: float, lr: float, grad_norm: float, epoch: float) -> None:
        if self.share is not None:
            self.timed_steps += 1
            self.timed_seconds += self.share
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
                        "pairs_per_second": self.rate(), **self.compiler.report()})
            self.losses, self.grad_norms = [], []
            self.timed_steps, self.timed_seconds = 0, 0.0

    def rate(self) -> float | None:
        if not self.timed_steps:
            return None
        return round(self.timed_steps * self.cfg.batch_size / self.timed_seconds, 2)

    def eval(self, step: int, epoch: float, results: list) -> None:
        metrics = {f"eval_{k}": v for _, m in results for k, v in m.items()}
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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as e:  # a line cut short is skipped by read_metrics when the run resumes
            raise write_failed(e, self.path, f"the record of step {record['step']} to metrics.jsonl") from None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


