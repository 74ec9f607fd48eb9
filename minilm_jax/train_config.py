"""A training run's settings: `TrainConfig` (every option of train.py, the defaults being the reference
recipe) and the losses they name. Below the loop (train_lib.py), the run folder (run_folder.py) and
the export (run_export.py), which all read it.
"""

from __future__ import annotations

import dataclasses
import math

from minilm_jax import losses
from minilm_jax.embedding import compute_dtype
from minilm_jax.errors import UsageError, UserError

BATCH_SAMPLERS = ("auto", "shuffle", "no-duplicates")
# How several datasets share the steps (input/schedule.py): sentence-transformers' two, and an endless
# weighted mix as all-MiniLM-L6-v2 was trained.
MULTI_DATASET_SAMPLERS = ("proportional", "round-robin", "weighted")
# Rows a stream shuffles at a time (input/stream.py): a device's share of a dataset up to this size is
# shuffled whole, as one permutation per epoch.
SHUFFLE_WINDOW = 1 << 19
DEFAULT_DATASET = "sentence-transformers/quora-duplicates"
DEFAULT_DATASET_SUBSET = "pair-class"


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; the defaults are the reference recipe."""

    output_dir: str = "runs/quora"
    model: str | None = None  # None: all-MiniLM-L6-v2
    # training files and glob patterns: "PATH" (one dataset) or "NAME=PATH" (named datasets)
    train_file: tuple = ()
    data_config: str | None = None  # a JSON file of named datasets (input/spec.py)
    dataset_weight: tuple = ()  # "NAME=WEIGHT" of the weighted sampler
    multi_dataset_sampler: str = "proportional"
    shuffle_window: int = SHUFFLE_WINDOW
    data_shards: int = 0  # streams per dataset (input/pipeline.py); 0: one per device
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
        if isinstance(self.train_file, str):  # one file, as the API took it before several
            object.__setattr__(self, "train_file", (self.train_file,))
        for name in ("evaluator", "loss_param", "matryoshka_dims", "negative_column", "prompt", "train_file",
                     "dataset_weight"):
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
        if sum(map(bool, (self.dataset, self.train_file, self.data_config))) > 1:
            raise UsageError("--dataset, --train-file and --data-config each name the training data; give one of them")
        if self.multi_dataset_sampler not in MULTI_DATASET_SAMPLERS:
            raise UsageError(f"--multi-dataset-sampler must be one of {', '.join(MULTI_DATASET_SAMPLERS)}, "
                             f"got {self.multi_dataset_sampler!r}")
        if self.data_shards < 0:
            raise UsageError(f"--data-shards must be 0 (one per device) or more, got {self.data_shards}")
        if self.shuffle_window < 1:
            raise UsageError(f"--shuffle-window must be at least 1, got {self.shuffle_window}")
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
        from minilm_jax.input.spec import dataset_specs

        dataset_specs(self)  # names, weights and each dataset's loss, before anything is read
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
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if self.data_config:  # what the file says, not only its name
            from minilm_jax.input.spec import dataset_specs

            fields["datasets"] = [spec.as_dict() for spec in dataset_specs(self)]
        return fields



def build_loss(cfg: TrainConfig):
    """The losses.* loss of --loss, with --loss-param, --mini-batch-size and --matryoshka-dims."""
    return make_loss(cfg.loss, cfg.loss_param, cfg.mini_batch_size, cfg.matryoshka_dims, 2 + len(cfg.negative_column))


def make_loss(name: str, loss_param=(), mini_batch_size: int = 0, matryoshka_dims=(), n_columns: int = 2):
    """The losses.* loss `name` (sentence-transformers' class name) with "NAME=VALUE" parameters, for
    data of `n_columns` text columns; a wrong setting is a usage error."""
    cls = losses.BY_NAME.get(name)
    if cls is None or cls is losses.MatryoshkaLoss:
        names = [n for n in losses.BY_NAME if n != "MatryoshkaLoss"]
        raise UsageError(f"--loss {name!r} is not one of {', '.join(names)} (MatryoshkaLoss: add "
                         "--matryoshka-dims to any of them)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = {}
    for item in loss_param:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "mini_batch_size":
            known = ", ".join(k for k in fields if k != "mini_batch_size") or "none"
            raise UsageError(f"--loss-param {item!r}: give NAME=VALUE with a parameter of {cls.name} ({known})")
        params[key] = _parse_param(cls.name, key, value, fields[key].default)
    if mini_batch_size:
        if "mini_batch_size" not in fields:
            raise UsageError(f"--mini-batch-size is for the Cached* losses (GradCache), not {cls.name}")
        params["mini_batch_size"] = mini_batch_size
    try:
        loss = cls(**params)
        if matryoshka_dims:
            loss = losses.MatryoshkaLoss(loss, tuple(matryoshka_dims))
        losses.check_columns(loss, n_columns)
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
