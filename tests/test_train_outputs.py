"""What a training run leaves behind, and the command line around it.

One short run of the real model (6 steps, logging every 2, evaluating and checkpointing every 3)
must leave metrics.jsonl, config.json, training.png, checkpoints/ and model/ (a
sentence-transformers folder with a model card) that sentence-transformers loads and that
embeds exactly as minilm_jax does. Also: `train.py --help` documents every option with its
default, the learning-rate schedule is transformers' get_linear_schedule_with_warmup, and
labels outside [0, 1] are refused naming the line unless --score-scale brings them in.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, read_pairs_tsv, run_cli
from tiny_model import write_tiny_model

EMBED_TOL = 1e-5
ST_FILES = ("modules.json", "sentence_bert_config.json", "config.json", "config_sentence_transformers.json",
            "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
            "1_Pooling/config.json")


def write_subset(src: Path, dst: Path, n_pairs: int, edit=None) -> Path:
    """The header and the first n_pairs rows of a real data file; `edit(i, fields)` may change row i."""
    with open(src, encoding="utf-8") as f:
        header, *rows = [next(f) for _ in range(n_pairs + 1)]
    out = [header]
    for i, row in enumerate(rows):
        fields = row.rstrip("\n").split("\t")
        if edit is not None:
            fields = edit(i, fields)
        out.append("\t".join(fields) + "\n")
    dst.write_text("".join(out), encoding="utf-8")
    return dst


# ----------------------------------------------------------------------------- one real-model run

@pytest.fixture(scope="module")
def real_run(tmp_path_factory, model_path, data_dir):
    root = tmp_path_factory.mktemp("real-run")
    train = write_subset(data_dir / "quora_train.tsv", root / "train.tsv", 96)  # 6 steps = 1 epoch
    evals = write_subset(data_dir / "quora_dev.tsv", root / "eval.tsv", 64)
    out = root / "out"
    proc = run_cli("train.py", "--model", model_path, "--train-file", train, "--eval-file", evals,
                   "--output-dir", out, "--max-steps", 6, "--log-every", 2, "--eval-every", 3,
                   "--checkpoint-every", 3, "--no-progress")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return out, evals, json.loads(proc.stdout.strip().splitlines()[-1])


def test_run_folder_layout(real_run):
    out, _, summary = real_run
    assert summary["output_dir"] == str(out) and summary["model"] == f"{out}/model"
    for name in ("metrics.jsonl", "config.json", "training.png", "checkpoints", "model"):
        assert (out / name).exists(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "training.png").stat().st_size > 5000
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]


def test_config_json_records_the_run(real_run, model_path):
    out, evals, _ = real_run
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 6 and config["log_every"] == 2 and config["eval_every"] == 3
    assert config["checkpoint_every"] == 3 and config["model"] == model_path and config["eval_file"] == str(evals)
    assert (config["batch_size"], config["learning_rate"], config["seed"], config["dropout"]) == (16, 5e-5, 42, True)


def test_metrics_jsonl(real_run):
    out, _, summary = real_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_spearman_cosine" in r]
    assert len(train) + len(evals) == len(records)
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert {"step", "epoch", "loss", "learning_rate", "pairs_per_second"} <= set(r), r
        assert r["epoch"] == pytest.approx(r["step"] / 6, abs=1e-4)
        assert 0 < r["loss"] < 1 and np.isfinite(r["loss"])
        assert r["pairs_per_second"] is not None and r["pairs_per_second"] > 0
    # The logged rate is the one of the step logged: 5e-5 * (1 - (step - 1) / 6).
    assert [r["learning_rate"] for r in train] == pytest.approx([5e-5 * (1 - (s - 1) / 6) for s in (2, 4, 6)],
                                                                rel=1e-6)
    for r in evals:
        assert {"step", "epoch", "eval_spearman_cosine", "eval_pearson_cosine"} <= set(r), r
        assert -1 <= r["eval_spearman_cosine"] <= 1 and -1 <= r["eval_pearson_cosine"] <= 1
    # The final evaluation is the step-6 one, and it is what train.py prints.
    assert summary["spearman_cosine"] == evals[-1]["eval_spearman_cosine"]
    assert summary["pearson_cosine"] == evals[-1]["eval_pearson_cosine"]


def test_exported_model_is_a_sentence_transformers_folder_with_a_card(real_run, model_path):
    out, _, _ = real_run
    model_dir = out / "model"
    for name in ST_FILES:
        assert (model_dir / name).is_file(), f"model/{name} missing"
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "loss:CosineSimilarityLoss" in card and "dataset_size:96" in card
    assert "## Training Details" in card and "### Training Logs" in card
    modules = json.loads((model_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]

    from safetensors.numpy import load_file

    base, trained = load_file(os.path.join(model_path, "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert sorted(base) == sorted(trained)
    changed = [k for k in base if not np.array_equal(base[k], trained[k])]
    assert len(changed) > 50, f"6 training steps changed only {len(changed)} tensors"


def test_sentence_transformers_loads_export_and_matches_minilm_jax(real_run, data_dir):
    from sentence_transformers import SentenceTransformer

    import minilm_jax
    from minilm_jax.metrics import evaluate_pairs
    from minilm_jax.pairs import load_pairs

    out, evals, summary = real_run
    st = SentenceTransformer(str(out / "model"), device="cpu")
    st.eval()
    assert st.max_seq_length == 256
    sentences = [s for a, b, _ in read_pairs_tsv(data_dir / "stsb_dev.tsv")[:40] for s in (a, b)]
    sentences += ["", "A much longer sentence " * 40]
    # One batch each: one compiled shape on our side.
    ours = minilm_jax.encode(sentences, str(out / "model"), batch_size=len(sentences))
    theirs = st.encode(sentences, batch_size=len(sentences), convert_to_numpy=True, normalize_embeddings=True)
    assert ours.shape == theirs.shape == (len(sentences), 384)
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff <= EMBED_TOL, f"max |ours - sentence-transformers| = {diff}"
    # The logged final evaluation is the exported model's.
    again = evaluate_pairs(minilm_jax.load(str(out / "model")), load_pairs(str(evals)), batch_size=64)
    assert again["spearman_cosine"] == pytest.approx(summary["spearman_cosine"], abs=1e-6)


# ----------------------------------------------------------------------------- the command line

def test_help_lists_every_option_with_its_default():
    proc = run_cli("train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    expected_defaults = {"--max-steps": "0", "--epochs": "2", "--batch-size": "16", "--learning-rate": "5e-05",
                         "--warmup-steps": "0", "--weight-decay": "0.0", "--seed": "42", "--model": "all-MiniLM-L6-v2",
                         "--output-dir": "runs/quora", "--checkpoint-every": "500", "--eval-every": "0",
                         "--max-seq-length": "0"}
    # Each option's entry: from its line to the next option's line, whitespace collapsed.
    entries = {}
    for block in re.split(r"\n(?=  -)", text):
        match = re.match(r"\s*(--[a-z0-9-]+)", block)
        if match:
            entries[match.group(1)] = " ".join(block.split())
    for option, default in expected_defaults.items():
        assert option in entries, f"{option} not in train.py --help:\n{text}"
        assert re.search(rf"default: {re.escape(default)}\b", entries[option]), \
            f"{option} does not show its default {default!r}: {entries[option]!r}"


@pytest.mark.parametrize("warmup", [0, 10])
def test_learning_rate_schedule_is_transformers_linear(warmup):
    import torch
    from transformers import get_linear_schedule_with_warmup

    from minilm_jax.train_lib import TrainConfig, learning_rate_schedule

    total, lr = 100, 3e-5
    schedule = learning_rate_schedule(TrainConfig(learning_rate=lr, warmup_steps=warmup), total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    factor = get_linear_schedule_with_warmup(opt, warmup, total).lr_lambdas[0]
    steps = sorted({0, 1, 2, 5, max(warmup - 1, 0), warmup, warmup + 1, 37, 50, 98, 99, 100})
    ours = np.array([float(schedule(s)) for s in steps])
    theirs = np.array([factor(s) * lr for s in steps])
    # float32 schedule values: near the end of the decay, 1 - step/total loses relative precision.
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7 * lr, err_msg=f"steps {steps}")
    assert ours[steps.index(total)] == 0.0
    if warmup:
        assert ours[0] == 0.0 and ours[steps.index(warmup)] == pytest.approx(lr, rel=1e-6)
    else:
        assert ours[0] == pytest.approx(lr, rel=1e-6)


@pytest.mark.parametrize("warmup", [0, 1, 37])
def test_learning_rates_are_the_schedule_as_jax_computes_it(warmup):
    """train.py's per-step rates come from numpy (no compilations at a run's start): they must be
    the optax schedule's values as JAX computes them, to the bit, so that a run's result does not
    depend on where they were computed."""
    import jax
    import jax.numpy as jnp

    from minilm_jax.train_lib import TrainConfig, learning_rate_schedule, learning_rates

    for lr in (5e-5, 3e-5, 1e-4, 0.1, 1.0):
        for total in (1, 2, 7, 300, 4118):
            cfg = TrainConfig(learning_rate=lr, warmup_steps=warmup)
            ours = learning_rates(cfg, total)
            theirs = np.asarray(jax.vmap(learning_rate_schedule(cfg, total))(jnp.arange(total)), np.float32)
            assert ours.dtype == np.float32 and ours.shape == (total,)
            np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32),
                                          err_msg=f"lr {lr}, warm-up {warmup}, {total} steps")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path) -> str:
    return write_tiny_model(model_path, str(tmp_path_factory.mktemp("tiny") / "model"))


def test_label_out_of_range_names_the_line(tiny, data_dir, tmp_path):
    def score_3(i, fields):
        return fields[:2] + ["3.0"] if i == 4 else fields  # the 5th data row: line 6 of the file

    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "bad.tsv", 32, edit=score_3)
    proc = run_cli("train.py", "--model", tiny, "--train-file", train, "--output-dir", tmp_path / "out",
                   "--max-steps", 2, "--no-progress")
    line = assert_user_error(proc, 1, f"{train} line 6", "3.0", "--score-scale 5")
    assert "[0, 1]" in line
    assert not (tmp_path / "out" / "model").exists()


def test_score_scale_5_trains_on_stsb(tiny, data_dir, tmp_path):
    train = write_subset(data_dir / "stsb_train.tsv", tmp_path / "stsb_train.tsv", 32)
    top = max(s for _, _, s in read_pairs_tsv(train))
    assert 1.0 < top <= 5.0  # 0-5 scores, which only --score-scale 5 makes labels
    out = tmp_path / "out"
    proc = run_cli("train.py", "--model", tiny, "--train-file", train, "--score-scale", 5,
                   "--output-dir", out, "--max-steps", 2, "--log-every", 1, "--no-progress")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(0 < r["loss"] < 1 for r in records)
    assert json.loads((out / "config.json").read_text())["score_scale"] == 5
    assert (out / "model" / "model.safetensors").exists()
    # The card's score statistics are the scaled labels, all in [0, 1].
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    assert f"max: {round(top / 5, 2)}</li>" in card
