#!/usr/bin/env python
"""Fine-tune all-MiniLM-L6-v2 (or another BERT sentence model) with CosineSimilarityLoss,
data-parallel over all devices with jax.pmap (plain jax.jit on one device). The defaults are the
reference recipe.

    python train.py --train-file ../shared/data/quora_train.tsv --eval-file ../shared/data/quora_dev.tsv \\
        --output-dir runs/quora

Run the same command again with the same --output-dir to resume from the last checkpoint.
SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop it after the step in flight with a checkpoint of that step,
exit status 75 (README, "Preemptible machines"); a second Ctrl-C stops at once.
OUTPUT gets: metrics.jsonl, config.json, training.png, checkpoints/, and model/ (a
sentence-transformers model folder with a README.md model card).

Several hosts: start the same command on every host, with --distributed on a TPU pod slice, SLURM,
Open MPI or Kubernetes, or with --coordinator-address/--num-processes/--process-id by hand; each
host feeds its own devices and --batch-size stays the global batch (README, "Several hosts").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

# Stop signals that come while the library is imported (jax takes seconds) are kept, and answered in main()
# once preemption.StopSignals is installed: no signal in the first moments of a run goes unanswered.
EARLY_SIGNALS: list[int] = []
for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(_signum, lambda signum, _frame: EARLY_SIGNALS.append(signum))

from minilm_jax import distributed  # noqa: E402
from minilm_jax import preemption  # noqa: E402
from minilm_jax.errors import Stopped, UsageError, cli_main  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from minilm_jax.evaluators import EVALUATORS
    from minilm_jax.losses import BY_NAME
    from minilm_jax.train_config import BATCH_SAMPLERS, MULTI_DATASET_SAMPLERS, TrainConfig

    d = TrainConfig()
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-file", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="training pairs: .tsv, .csv, .jsonl (each also .gz) or .parquet files, or glob patterns "
                   "(quoted), read as a stream (columns sentence1, sentence2, score). Several datasets: NAME=PATH "
                   "for each file (each batch comes from one dataset; see --multi-dataset-sampler)")
    g.add_argument("--data-config", help="a JSON file of named datasets, each with its files, columns, weight and "
                   "loss (README, 'Several datasets'), instead of --train-file")
    g.add_argument("--dataset-weight", action="append", default=[], metavar="NAME=WEIGHT",
                   help="a dataset's weight for --multi-dataset-sampler weighted (repeatable; default 1)")
    g.add_argument("--multi-dataset-sampler", default=d.multi_dataset_sampler, choices=MULTI_DATASET_SAMPLERS,
                   help="how several datasets share the steps, each batch from one dataset: proportional (every "
                   "row once per epoch), round-robin (in turn, the epoch ends with the smallest) or weighted (each "
                   "step draws its dataset by weight) (default: %(default)s)")
    g.add_argument("--data-shards", type=int, default=d.data_shards,
                   help="read each dataset as this many streams, each giving batch / shards rows to every step; a "
                   "multiple of the device count and a divisor of --batch-size. The batch order depends on it, not "
                   "on the devices: runs with the same value train alike on any device count that divides it, and "
                   "resume on one. 0: one per device (default: %(default)s)")
    g.add_argument("--shuffle-window", type=int, default=d.shuffle_window,
                   help="rows shuffled together: each device reads its share of the data this many rows at a "
                   "time and shuffles them; memory grows with it, not with the data (default: %(default)s)")
    g.add_argument("--eval-file", help="evaluation pairs, same format; evaluated each epoch and every --eval-every steps")
    g.add_argument("--evaluator", nargs="+", default=list(d.evaluator), choices=EVALUATORS, metavar="NAME",
                   help=f"what to evaluate on the eval pairs, one or more of {', '.join(EVALUATORS)}: "
                   "sentence-transformers' EmbeddingSimilarity, BinaryClassification (0/1 labels), "
                   "InformationRetrieval (the positives' sentence2 texts as the corpus) and ParaphraseMining "
                   "evaluators (default: %(default)s)")
    g.add_argument("--dataset", help="a Hugging Face hub dataset instead of --train-file (needs network); "
                   f"with no data option: {'sentence-transformers/quora-duplicates'} (pair-class), split 90/10 with --seed")
    g.add_argument("--dataset-subset", help="the hub dataset's subset (configuration) name")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="share of a hub dataset held out for evaluation (default: %(default)s)")
    g.add_argument("--sentence1-column", default=d.sentence1_column, help="default: %(default)s")
    g.add_argument("--sentence2-column", default=d.sentence2_column, help="default: %(default)s")
    g.add_argument("--score-column", default=d.score_column,
                   help="default: %(default)s (for the default hub dataset: label)")
    g.add_argument("--score-scale", type=float, default=d.score_scale,
                   help="divide scores by this; 5 turns 0-5 STS scores into [0, 1] (default: %(default)s)")
    g.add_argument("--negative-column", action="append", default=[], metavar="NAME",
                   help="a hard-negative text column of the training data (repeatable), for the "
                   "MultipleNegatives losses: rows are (anchor, positive, negatives...)")
    g.add_argument("--prompt", action="append", default=[], metavar="[COLUMN=]TEXT",
                   help="put TEXT before every text of COLUMN (repeatable), or of every column without COLUMN=, as "
                   "sentence-transformers' `prompts` training argument; @NAME is the model's prompt NAME "
                   "(e.g. --prompt sentence1=@query)")
    g.add_argument("--positives-only", action="store_true",
                   help="train on the rows labelled 1 of a 0/1 pair-class file (duplicates as positive pairs, "
                   "for the in-batch-negative losses)")
    g.add_argument("--add-swapped", action="store_true",
                   help="also train on every row swapped, (sentence2, sentence1, ...): symmetric data such as "
                   "duplicate questions, twice the rows")
    g.add_argument("--batch-sampler", default=d.batch_sampler, choices=list(BATCH_SAMPLERS),
                   help="shuffle, or no-duplicates (no text twice in a batch: a repeated text is a false "
                   "negative); auto: no-duplicates for the MultipleNegatives losses (default: %(default)s)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default=d.loss, choices=[n for n in BY_NAME if n != "MatryoshkaLoss"], metavar="NAME",
                   help=f"{', '.join(n for n in BY_NAME if n != 'MatryoshkaLoss')} (sentence-transformers' losses, "
                   "its parameter names and defaults) (default: %(default)s)")
    g.add_argument("--loss-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the loss, e.g. scale=20 (repeatable; tuples comma-separated)")
    g.add_argument("--mini-batch-size", type=int, default=d.mini_batch_size,
                   help="the Cached* losses (GradCache): sentences per micro-batch; memory is bounded by it, "
                   "not by the batch (default: the loss's, 32)")
    g.add_argument("--matryoshka-dims", type=int, nargs="+", default=list(d.matryoshka_dims), metavar="DIM",
                   help="wrap the loss in MatryoshkaLoss over these dimensions, e.g. 384 256 128 64")
    g = p.add_argument_group("recipe")
    g.add_argument("--model", default=d.model, help="base model folder (default: all-MiniLM-L6-v2)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps; 0: all epochs "
                   "(default: %(default)s). The learning rate decays to 0 at the last step")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global pairs per step, split over the devices (default: %(default)s)")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="AdamW peak rate (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="default: %(default)s")
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="default: %(default)s")
    g.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon, help="default: %(default)s")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="global-norm gradient clipping (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="shuffling, dropout and hub split (default: %(default)s)")
    g.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="turn dropout off (default: on, at the model config's rates, 0.1)")
    g.add_argument("--max-seq-length", type=int, default=d.max_seq_length,
                   help="truncate sentences at this many tokens; 0: the model's (256) (default: %(default)s)")
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"],
                   help="matmul dtype; bfloat16 for GPU/TPU, weights stay float32 (default: %(default)s)")
    g.add_argument("--steps-per-dispatch", type=int, default=d.steps_per_dispatch,
                   help="optimizer steps per device call (lax.scan); >1 cuts per-step overhead on accelerators "
                   "(default: %(default)s)")
    g.add_argument("--packed-tokens", type=int, default=d.packed_tokens,
                   help="tokens per device in the packed batch most steps run in; a step that does not fit "
                   "runs as micro-batches, with the same result. 0: 18 per sentence (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=d.output_dir, help="default: %(default)s")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps (default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="default: %(default)s")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps; 0: only at the end of each epoch (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps per metrics.jsonl record (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="default: %(default)s")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("several processes (hosts): run the same command on every one; see README 'Several hosts'")
    distributed.add_arguments(g)
    return p


@cli_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    several = distributed.parse_options(argv)  # usage errors of these options, before anything starts
    if several.enabled and not distributed.is_worker():
        if EARLY_SIGNALS:
            print(f"stopped: received {signal.Signals(EARLY_SIGNALS[0]).name} before training began, nothing to save; "
                  "run the same command again to start", file=sys.stderr)
            return preemption.STOPPED_EXIT
        # The training runs in a child process, so that a lost peer ends it with one error line (see distributed.py).
        return distributed.supervise([sys.executable, os.path.abspath(__file__), *argv], several)
    # From here on SIGTERM, SIGINT and SIGUSR1 stop the run at the next step every process agrees on, with a
    # checkpoint, and exit status 75 (preemption.py); before the first step nothing is lost.
    signals = preemption.StopSignals(exit_at_once=True, one_process=not several.enabled).install(EARLY_SIGNALS)
    args = vars(build_parser().parse_args(argv))
    from minilm_jax.host_memory import keep_step_memory

    keep_step_memory()  # before JAX's backend starts: each step's temporaries stay mapped
    progress = args.pop("progress")
    for name in distributed.ARGUMENT_NAMES:  # parsed above, before anything started
        del args[name]
    with distributed.failures_reported(several):
        if several.enabled:
            distributed.initialize(several)
        from minilm_jax.compilation_cache import enable_compilation_cache
        from minilm_jax.train_lib import TrainConfig, train_and_evaluate

        enable_compilation_cache()

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in args.items() if k in names})
        try:
            result = train_and_evaluate(cfg, progress=progress, signals=signals)
        except Stopped as stopped:
            preemption.leave(stopped)
    print(json.dumps({"output_dir": cfg.output_dir, "model": f"{cfg.output_dir}/model", **result}))


if __name__ == "__main__":
    sys.exit(main())
