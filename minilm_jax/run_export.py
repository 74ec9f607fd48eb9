"""The end of a run: training.png, the model card's run summary, and the exported
sentence-transformers folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import optax

from minilm_jax import checkpoint_io
from minilm_jax.run_folder import read_metrics

if TYPE_CHECKING:
    from minilm_jax.train_lib import RunData, TrainConfig


def token_stats(ids: list) -> dict:
    lengths = np.array([len(x) for x in ids])
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}



def export_run(cfg: TrainConfig, out: Path, model, run_data: RunData, tokens, final_eval: dict, total_steps: int,
            per_epoch: int, n_devices: int) -> None:
    from minilm_jax.model_card import render_model_card
    from minilm_jax.plot import plot_training

    records = read_metrics(out / "metrics.jsonl", total_steps)
    plot_training(records, str(out / "training.png"))
    card = render_model_card(run_summary(cfg, model, run_data, tokens, records, final_eval, n_devices))
    checkpoint_io.save_sentence_transformers(model, str(out / "model"), overwrite=True,
                                             extra_files={"README.md": card})


def run_summary(cfg: TrainConfig, model, run_data: RunData, tokens, records: list, final_eval: dict,
                n_devices: int) -> dict:
    import flax
    import datasets
    import tokenizers

    from minilm_jax import __version__

    defaults = type(cfg)()  # the recipe: TrainConfig's defaults
    hyper = {"learning_rate": cfg.learning_rate, "per_device_train_batch_size": cfg.batch_size // n_devices,
             "train_batch_size": cfg.batch_size, "num_train_epochs": cfg.epochs, "max_steps": cfg.max_steps,
             "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay, "adam_beta1": cfg.adam_beta1,
             "adam_beta2": cfg.adam_beta2, "adam_epsilon": cfg.adam_epsilon, "max_grad_norm": cfg.max_grad_norm,
             "seed": cfg.seed, "lr_scheduler_type": "linear", "dropout": cfg.dropout, "dtype": cfg.dtype,
             "num_devices": n_devices, "steps_per_dispatch": cfg.steps_per_dispatch}
    default_hyper = {**hyper, **{k: getattr(defaults, k) for k in (
        "learning_rate", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
        "max_grad_norm", "seed", "dropout", "dtype", "max_steps", "steps_per_dispatch")},
        "num_train_epochs": defaults.epochs, "train_batch_size": defaults.batch_size}
    by_step: dict[int, dict] = {}
    for r in records:
        row = by_step.setdefault(r["step"], {"epoch": r.get("epoch"), "step": r["step"], "loss": None,
                                             "spearman_cosine": None})
        if "loss" in r:
            row["loss"] = r["loss"]
        if "eval_spearman_cosine" in r:
            row["spearman_cosine"] = r["eval_spearman_cosine"]
    train = run_data.train
    samples = [{"sentence1": train.sentence1[i], "sentence2": train.sentence2[i], "score": float(train.scores[i])}
               for i in range(min(3, len(train)))]
    return {
        "base_model": cfg.model or "sentence-transformers/all-MiniLM-L6-v2",
        "base_model_path": model.path,
        "max_seq_length": model.sentence.max_seq_length, "hidden_size": model.config.hidden_size,
        "do_lower_case": model.sentence.do_lower_case, "normalize": model.sentence.normalize,
        "train_dataset": {
            "name": run_data.train_name, "size": len(train),
            "columns": [cfg.sentence1_column, cfg.sentence2_column, cfg.score_column],
            "stats": {"sentence1": token_stats(tokens.ids1), "sentence2": token_stats(tokens.ids2),
                      "score": {"min": float(train.scores.min()), "mean": float(train.scores.mean()),
                                "max": float(train.scores.max())}},
            "samples": samples},
        "eval_dataset": {"name": run_data.eval_name, "size": len(run_data.eval)} if run_data.eval is not None else None,
        "hyperparameters": hyper, "default_hyperparameters": default_hyper,
        "log": [by_step[s] for s in sorted(by_step)],
        "final_eval": {k.removeprefix("eval_"): v for k, v in final_eval.items()} or None,
        "versions": {"python": sys.version.split()[0], "minilm_jax": __version__, "jax": jax.__version__,
                     "flax": flax.__version__, "optax": optax.__version__, "tokenizers": tokenizers.__version__,
                     "datasets": datasets.__version__},
    }
