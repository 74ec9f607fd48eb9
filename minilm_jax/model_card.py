"""The README.md written beside an exported model, laid out like the card that
sentence-transformers' SentenceTransformerTrainer writes (sentence-transformers 6.x's
`model_card_template.md`), so the Hub shows it the way it shows any fine-tuned
sentence-transformers model: same YAML metadata, same sections, same table formats.

`render_model_card(run)` is a pure function of the run summary that `run_export.run_summary`
builds; the keys are documented there by example and in `render_model_card`'s docstring.
Nothing here reads files or imports sentence-transformers.
"""

from __future__ import annotations

import json
import math
import numbers
import re

_ST_LOSS_DOCS = "https://sbert.net/docs/package_reference/sentence_transformer/losses.html#{anchor}"
_ST_EVALUATOR_DOCS = ("https://sbert.net/docs/package_reference/sentence_transformer/evaluation.html"
                      "#sentence_transformers.sentence_transformer.evaluation.{name}")
_TASKS = "semantic textual similarity, semantic search, paraphrase mining, classification, clustering, and more"
_USAGE_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
# The roles of the three pair columns; the dataset may call them anything (`columns`), but
# `stats` and `samples` are keyed by role.
_ROLES = ("sentence1", "sentence2", "score")
_DATA_FILE_SUFFIXES = (".tsv", ".tab", ".csv", ".json", ".jsonl", ".parquet", ".txt")
_MAX_SAMPLE_CHARS = 1000  # as sentence-transformers: a card is not the place for a whole document
_HIDE_LOGS_ABOVE = 100  # rows; longer logs go in a collapsed <details>, as sentence-transformers does

_CITATION = """\
@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    month = "11",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""


def render_model_card(run: dict) -> str:
    """The model card (markdown with YAML front matter) for one training run.

    `run` has every one of these keys:
      base_model {id: hub id | None, name, read_from: str | None, parent: {id, read_from} | None}:
        the card names the model by `id` (linked, and as the YAML's base_model) or else by `name`
        (the folder's name, never a path); `read_from` says how a local folder's id was recognised;
        `parent`, for a folder without an id, the hub model that folder was trained from;
      max_seq_length, hidden_size, do_lower_case, normalize;
      and optionally (all-MiniLM-L6-v2's stack when absent) pooling: the 1_Pooling/config.json written,
        dense [each Dense module's config.json], embedding_dimension, similarity_fn_name, prompts {name: text};
      train_dataset {name, id: hub id | None, size, columns, stats {sentence1, sentence2,
        score: {min, mean, max}}, samples [{sentence1, sentence2, score}]};
      eval_dataset {name, id, size} | None;
      loss {name, parameters}: a sentence-transformers loss name and its get_config_dict();
      evaluations [{name, description, implementation, dataset, primary_metric, metrics {key: value}}]:
        one metrics table (and one model-index result) per entry; [] without evaluation;
      widget [{source_sentence, sentences [...]}]: the Hub's sentence-similarity examples;
      hyperparameters, default_hyperparameters;
      log [{epoch, step, loss | None, evals {"<dataset>_<metric>": value}}];
      versions {python, minilm_jax, jax, flax, optax, tokenizers, datasets}.
    `stats` are token counts over the first `stats_rows` rows the run took (sentence-transformers' cards
    take the first 1,000 rows too); `size` is None where the rows were not counted (a run of
    --max-steps over streamed data).
    """
    sections = [
        _front_matter(run),
        _introduction(run),
        _model_details(run),
        _usage(run),
        _evaluation(run),
        _training_details(run),
        _framework_versions(run["versions"]),
        _citation(),
    ]
    return "\n".join(section for section in sections if section).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- names

def _model_name(run: dict) -> str:
    base = run["base_model"]
    return f"SentenceTransformer based on {base['id'] or _file_name(base['name'])}"


def is_hub_id(name: str) -> bool:
    """'org/name' on the Hugging Face Hub, as opposed to a local file or folder.

    Only a guess from the spelling (this module does no I/O): one slash, no leading '.', '/'
    or '~', and no data-file suffix."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
            and not name.lower().endswith(_DATA_FILE_SUFFIXES))


def _file_name(name: str) -> str:
    return re.split(r"[/\\]", name.rstrip("/\\"))[-1]


def short_name(name: str) -> str:
    """'data/stsb_dev.tsv' -> 'stsb_dev'; 'sentence-transformers/stsb' -> 'stsb': the label
    sentence-transformers would give its evaluator (used in column names and the model-index)."""
    last = _file_name(name)
    for suffix in _DATA_FILE_SUFFIXES:
        if last.lower().endswith(suffix):
            last = last[: -len(suffix)]
            break
    return re.sub(r"[^\w.-]+", "-", last).strip("-") or "eval"


def _dataset_markdown(dataset: dict) -> str:
    """A Hub dataset as a link; a local file by its file name only (its folder is of no use to a
    reader of the card, and may be a private path)."""
    if dataset.get("id"):
        return f"[{dataset['name']}](https://huggingface.co/datasets/{dataset['id']})"
    return f"`{_file_name(dataset['name'])}`"


def _base_model_markdown(base: dict) -> str:
    if base["id"]:
        return f"[{base['id']}](https://huggingface.co/{base['id']})"
    return f"`{_file_name(base['name'])}`"


def _hub_datasets(run: dict) -> list[str]:
    ids = [d.get("id") for d in (run["train_dataset"], run["eval_dataset"]) if d]
    return list(dict.fromkeys(i for i in ids if i and is_hub_id(i)))


# ----------------------------------------------------------------------------- formatting

def _number(value) -> str:
    """Floats to at most 4 decimals, as sentence-transformers' tables show them; ints as ints."""
    if value is None:
        return "-"
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return str(round(float(value), 4))
    return str(value)


# Characters that would end a table cell, open an HTML tag, or start markdown emphasis or code
# inside a sample: written as character references so the sentence shows exactly as it is.
_CELL_ESCAPES = str.maketrans({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "&#92;", "`": "&#96;", "*": "&#42;", "_": "&#95;",
    "[": "&#91;", "]": "&#93;", "|": "\\|",
})


def _table_cell(text: str) -> str:
    """One line of markdown-table-safe text (newlines become <br>, pipes are escaped)."""
    if len(text) > _MAX_SAMPLE_CHARS:
        text = text[:_MAX_SAMPLE_CHARS] + "..."
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "<br>".join(line.translate(_CELL_ESCAPES) for line in lines)


def _markdown_table(header: list[str], rows: list[list[str]], centered: bool = False) -> str:
    """A padded markdown table, byte for byte as transformers' make_markdown_table writes it
    (sentence-transformers left-aligns its dataset and metric tables, centres its log table)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells) -> str:
        return "".join(f"| {cell}" + " " * (width - len(cell) + 1) for cell, width in zip(cells, widths)) + "|"

    rule = "".join(f"|:{'-' * w}:" if centered else f"|:{'-' * (w + 1)}" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _indent(text: str, prefix: str = "  ") -> str:
    """Indent under a list item, as sentence-transformers nests its dataset tables."""
    return "\n".join(prefix + line if line else line for line in text.split("\n"))


def _yaml_string(value: str) -> str:
    """A plain YAML scalar when the text cannot be read as anything but this string; otherwise a
    double-quoted one (JSON strings are valid YAML)."""
    plain = (re.fullmatch(r"[A-Za-z][\w ./:+-]*", value) is not None
             and ": " not in value and not value.endswith((":", " "))
             and value.lower() not in {"true", "false", "yes", "no", "on", "off", "null", "y", "n"})
    return value if plain else json.dumps(value, ensure_ascii=False)


def _yaml_number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


def _numeric_metrics(metrics: dict | None) -> dict[str, float]:
    return {key: value for key, value in (metrics or {}).items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)}


def _evaluations(run: dict) -> list[dict]:
    """The evaluations that have numeric metrics, with those metrics only."""
    return [{**e, "metrics": _numeric_metrics(e["metrics"])} for e in run["evaluations"]
            if _numeric_metrics(e["metrics"])]


def _yaml_list(key: str, items: list[str], indent: str = "") -> list[str]:
    return [f"{indent}{key}:", *(f"{indent}- {_yaml_string(item)}" for item in items)]


# ----------------------------------------------------------------------------- sections

def _front_matter(run: dict) -> str:
    """The YAML metadata, in the order sentence-transformers' cards have it."""
    loss = run["loss"]["name"]
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "generated_from_trainer",
            *([f"dataset_size:{run['train_dataset']['size']}"] if run["train_dataset"]["size"] else []),
            f"loss:{loss}"]
    lines = ["---", *_yaml_list("tags", tags)]
    # The Hub rejects a base_model or dataset that is not a repository id: local names are left out.
    if run["base_model"]["id"] and is_hub_id(run["base_model"]["id"]):
        lines.append(f"base_model: {_yaml_string(run['base_model']['id'])}")
    if run["widget"]:
        lines.append("widget:")
        for example in run["widget"]:
            lines.append(f"- source_sentence: {_yaml_string(example['source_sentence'])}")
            lines += _yaml_list("sentences", example["sentences"], indent="  ")
    if datasets := _hub_datasets(run):
        lines += _yaml_list("datasets", datasets)
    lines += ["pipeline_tag: sentence-similarity", "library_name: sentence-transformers"]
    evaluations = _evaluations(run)
    metric_keys = list(dict.fromkeys(key for e in evaluations for key in e["metrics"]))
    if metric_keys:
        lines += _yaml_list("metrics", metric_keys)
    if evaluations:
        lines += ["model-index:", f"- name: {_yaml_string(_model_name(run))}", "  results:"]
        for e in evaluations:
            label = e["dataset"] or "eval"
            lines += [
                "  - task:",
                f"      type: {_yaml_string(e['description'].lower().replace(' ', '-'))}",
                f"      name: {_yaml_string(e['description'])}",
                "    dataset:",
                f"      name: {_yaml_string(label.replace('_', ' ').replace('-', ' '))}",
                f"      type: {_yaml_string(label)}",
                "    metrics:",
            ]
            for key, value in e["metrics"].items():
                lines += [f"    - type: {_yaml_string(key)}",
                          f"      value: {_yaml_number(value)}",
                          f"      name: {_yaml_string(key.replace('_', ' ').title())}"]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _introduction(run: dict) -> str:
    base = _base_model_markdown(run["base_model"])
    data = _dataset_markdown(run["train_dataset"])
    return (
        f"# {_model_name(run)}\n\n"
        f"This is a [sentence-transformers](https://www.SBERT.net) model finetuned from {base} on the {data} "
        f"dataset. It maps inputs to a {_dimension(run)}-dimensional dense vector space and can be used "
        f"for {_TASKS}.\n\n"
        "It was fine-tuned in JAX/Flax with minilm-jax, which reproduces sentence-transformers' model, "
        "loss and metrics; the folder loads in both libraries.\n"
    )


_SIMILARITY_NAMES = {"cosine": "Cosine Similarity", "dot": "Dot Product", "euclidean": "Euclidean Distance",
                     "manhattan": "Manhattan Distance"}


def _dimension(run: dict) -> int:
    return run.get("embedding_dimension") or run["hidden_size"]


def _architecture(run: dict) -> str:
    """What `print(SentenceTransformer(folder))` shows for the classic folder layout we export
    (sentence_bert_config.json, 1_Pooling/config.json, N_Dense/config.json, N_Normalize)."""
    transformer = {"max_seq_length": run["max_seq_length"], "do_lower_case": run["do_lower_case"]}
    pooling = run.get("pooling") or {
        "word_embedding_dimension": run["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True,
    }
    modules = [f"Transformer({transformer!r}) with Transformer model: BertModel", f"Pooling({pooling!r})"]
    modules += [f"Dense({dense!r})" for dense in run.get("dense", ())]
    if run["normalize"]:
        modules.append("Normalize()")
    body = "\n".join(f"  ({i}): {module}" for i, module in enumerate(modules))
    return f"```\nSentenceTransformer(\n{body}\n)\n```"


def _base_model_source(base: dict) -> str:
    """How a local folder's hub id was recognised (a comment, as sentence-transformers notes the
    base model's revision); or, for a folder without one, the model it was itself trained from."""
    if base["id"]:
        return f" <!-- recognised by {base['read_from']} -->" if base.get("read_from") else ""
    parent = base.get("parent")
    if parent:
        return (f" (a local folder, itself fine-tuned from [{parent['id']}](https://huggingface.co/{parent['id']}), "
                f"as {parent['read_from']} says)")
    return ""


def _model_details(run: dict) -> str:
    return (
        "## Model Details\n\n"
        "### Model Description\n"
        "- **Model Type:** Sentence Transformer\n"
        f"- **Base model:** {_base_model_markdown(run['base_model'])}{_base_model_source(run['base_model'])}\n"
        f"- **Maximum Sequence Length:** {run['max_seq_length']} tokens\n"
        f"- **Output Dimensionality:** {_dimension(run)} dimensions\n"
        f"- **Similarity Function:** {_SIMILARITY_NAMES[run.get('similarity_fn_name', 'cosine')]}\n"
        f"{_prompts(run)}"
        "- **Training Dataset:**\n"
        f"    - {_dataset_markdown(run['train_dataset'])}\n\n"
        "### Model Sources\n\n"
        "- **Documentation:** [Sentence Transformers Documentation](https://sbert.net)\n"
        "- **Repository:** [Sentence Transformers on GitHub](https://github.com/huggingface/sentence-transformers)\n"
        "- **Hugging Face:** [Sentence Transformers on Hugging Face]"
        "(https://huggingface.co/models?library=sentence-transformers)\n\n"
        "### Full Model Architecture\n\n"
        f"{_architecture(run)}\n"
    )


def _prompts(run: dict) -> str:
    prompts = {k: v for k, v in (run.get("prompts") or {}).items() if v}
    if not prompts:
        return ""
    return "- **Prompts:**\n" + "".join(f"    - `{name}`: {json.dumps(text, ensure_ascii=False)}\n"
                                      for name, text in prompts.items())


def _usage(run: dict) -> str:
    n, dim = len(_USAGE_SENTENCES), _dimension(run)
    sentences = "\n".join(f"    {sentence!r}," for sentence in _USAGE_SENTENCES)
    return (
        "## Usage\n\n"
        "### Direct Usage (Sentence Transformers)\n\n"
        "First install the Sentence Transformers library:\n\n"
        "```bash\npip install -U sentence-transformers\n```\n"
        "Then you can load this model and run inference.\n"
        "```python\n"
        "from sentence_transformers import SentenceTransformer\n\n"
        "# This folder, or its Hugging Face Hub id once uploaded\n"
        'model = SentenceTransformer("path/to/this/model")\n'
        "# Run inference\n"
        f"sentences = [\n{sentences}\n]\n"
        "embeddings = model.encode(sentences)\n"
        "print(embeddings.shape)\n"
        f"# [{n}, {dim}]\n\n"
        "# Get the similarity scores for the embeddings\n"
        "similarities = model.similarity(embeddings, embeddings)\n"
        "print(similarities.shape)\n"
        f"# [{n}, {n}]\n"
        "```\n\n"
        "### Direct Usage (minilm-jax)\n\n"
        "The same folder loads in JAX, without PyTorch:\n"
        "```python\n"
        "import minilm_jax\n\n"
        'model = minilm_jax.load("path/to/this/model")\n'
        f"sentences = [\n{sentences}\n]\n"
        "embeddings = minilm_jax.encode(sentences, model)\n"
        "print(embeddings.shape)\n"
        f"# ({n}, {dim})\n\n"
        "similarities = minilm_jax.similarity(embeddings, embeddings)\n"
        "print(similarities.shape)\n"
        f"# ({n}, {n})\n"
        "```\n"
    )


def _evaluator_markdown(e: dict) -> str:
    link = f"[<code>{e['name']}</code>]({_ST_EVALUATOR_DOCS.format(name=e['name'])})"
    if e.get("implementation"):
        return (f"<code>{e['implementation']}</code>, which computes the metrics of sentence-transformers' "
                f"{link}")
    return link


def _evaluation(run: dict) -> str:
    evaluations = _evaluations(run)
    if not evaluations:
        return ""
    parts = ["## Evaluation\n\n### Metrics\n"]
    for e in evaluations:
        # The primary metric is bold, as in sentence-transformers' cards.
        rows = [[f"**{key}**", f"**{_number(value)}**"] if key == e.get("primary_metric") else [key, _number(value)]
                for key, value in e["metrics"].items()]
        dataset = f"* Dataset: `{e['dataset']}`\n" if e.get("dataset") else ""
        parts.append(f"\n#### {e['description']}\n\n{dataset}* Evaluated with {_evaluator_markdown(e)}\n\n"
                     f"{_markdown_table(['Metric', 'Value'], rows)}\n")
    return "".join(parts)


def _columns_phrase(columns: list[str]) -> str:
    names = [f"<code>{column}</code>" for column in columns]
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + ", and " + names[-1]


def _stats_table(dataset: dict) -> str:
    def details(stats: dict, unit: str) -> str:
        return "<ul>" + "".join(f"<li>{key}: {round(stats[key], 2)}{unit}</li>"
                                for key in ("min", "mean", "max")) + "</ul>"

    columns = dataset["columns"]
    text_roles = _ROLES[:2]
    header = [""] + columns
    rows = [
        ["type"] + ["string" if role in text_roles else "float" for role in _ROLES],
        ["modality"] + ["text" if role in text_roles else "" for role in _ROLES],
        ["details"] + [details(dataset["stats"][role], " tokens" if role in text_roles else "") for role in _ROLES],
    ]
    return _markdown_table(header, rows)


def _samples_table(dataset: dict) -> str:
    rows = [[f"<code>{_table_cell(str(sample[role]))}</code>" for role in _ROLES]
            for sample in dataset["samples"][:3]]
    return _markdown_table(dataset["columns"], rows)


def _loss_markdown(loss: dict) -> str:
    """As sentence-transformers' template: the loss linked to its documentation, its parameters as JSON."""
    text = f"* Loss: [<code>{loss['name']}</code>]({_ST_LOSS_DOCS.format(anchor=loss['name'].lower())})"
    if loss.get("parameters"):
        text += " with these parameters:\n" + _indent(f"```json\n{json.dumps(loss['parameters'], indent=4)}\n```")
    return text + "\n"


def _training_dataset(run: dict) -> str:
    dataset = run["train_dataset"]
    size = dataset["size"]
    parts = [
        "### Training Dataset\n\n",
        f"#### {short_name(dataset['name'])}\n\n",
        f"* Dataset: {_dataset_markdown(dataset)}\n",
        f"* Size: {size:,} training samples\n" if size else "* Size: not counted (streamed, trained for a number of steps)\n",
        f"* Columns: {_columns_phrase(dataset['columns'])}\n",
    ]
    if dataset["stats"]:
        parts += [f"* Approximate statistics based on the first {dataset.get('stats_rows') or size:,} samples:\n",
                  _indent(_stats_table(dataset)) + "\n"]
    if dataset["samples"]:
        parts += ["* Samples:\n", _indent(_samples_table(dataset)) + "\n"]
    parts.append(_loss_markdown(run["loss"]))
    return "".join(parts)


def _evaluation_dataset(run: dict) -> str:
    dataset = run["eval_dataset"]
    if not dataset:
        return ""
    return (
        "### Evaluation Dataset\n\n"
        f"#### {short_name(dataset['name'])}\n\n"
        f"* Dataset: {_dataset_markdown(dataset)}\n"
        f"* Size: {dataset['size']:,} evaluation samples\n"
    )


def non_default_hyperparameters(hyperparameters: dict, defaults: dict) -> dict:
    """The settings a reader needs to reproduce the run: those that differ from the defaults, and
    those that have no default at all."""
    return {name: value for name, value in hyperparameters.items()
            if name not in defaults or value != defaults[name]}


def _hyperparameters(run: dict) -> str:
    def bullets(values: dict) -> str:
        return "".join(f"- `{name}`: {value}\n" for name, value in values.items())

    changed = non_default_hyperparameters(run["hyperparameters"], run["default_hyperparameters"])
    text = "### Training Hyperparameters\n"
    if changed:
        text += "#### Non-Default Hyperparameters\n\n" + bullets(changed) + "\n"
    text += ("#### All Hyperparameters\n<details><summary>Click to expand</summary>\n\n"
             + bullets(run["hyperparameters"]) + "\n</details>\n")
    return text


def _log_columns(log: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in log for key in (row.get("evals") or {})))


def _primary_column(run: dict, columns: list[str]) -> str | None:
    """The log column of the first evaluation's primary metric, else the first evaluation column."""
    for e in run["evaluations"]:
        if f"{e.get('dataset')}_{e.get('primary_metric')}" in columns:
            return f"{e['dataset']}_{e['primary_metric']}"
    return columns[0] if columns else None


def _best_eval_step(log: list[dict], column: str | None):
    # A NaN correlation (constant predictions) is no candidate: max() would order it arbitrarily.
    scored = [row for row in log if column and isinstance((row.get("evals") or {}).get(column), numbers.Real)
              and math.isfinite(row["evals"][column])]
    if not scored:
        return None
    return max(scored, key=lambda row: row["evals"][column])["step"]


def _training_logs(run: dict) -> str:
    log = run["log"]
    if not log:
        return ""
    columns = _log_columns(log)
    primary = _primary_column(run, columns)
    header = ["Epoch", "Step", "Training Loss"] + columns
    best_step = _best_eval_step(log, primary)
    rows = []
    for row in log:
        cells = [_number(row.get("epoch")), _number(row["step"]), _number(row.get("loss"))]
        cells += [_number((row.get("evals") or {}).get(column)) for column in columns]
        rows.append([f"**{cell}**" for cell in cells] if row["step"] == best_step else cells)
    table = _markdown_table(header, rows, centered=True)
    if len(log) > _HIDE_LOGS_ABOVE:
        table = f"<details><summary>Click to expand</summary>\n\n{table}\n</details>"
    note = f"\n* The bold row has the best evaluation {primary}.\n" if best_step is not None else ""
    return f"### Training Logs\n{table}\n{note}"


def _training_details(run: dict) -> str:
    parts = [_training_dataset(run), _evaluation_dataset(run), _hyperparameters(run), _training_logs(run)]
    return "## Training Details\n\n" + "\n".join(part for part in parts if part)


def _framework_versions(versions: dict) -> str:
    names = [("python", "Python"), ("minilm_jax", "minilm-jax"), ("jax", "JAX"), ("flax", "Flax"),
             ("optax", "Optax"), ("tokenizers", "Tokenizers"), ("datasets", "Datasets")]
    return "### Framework Versions\n" + "".join(f"- {label}: {versions[key]}\n" for key, label in names)


def _citation() -> str:
    return f"## Citation\n\n### BibTeX\n\n#### Sentence Transformers\n```bibtex\n{_CITATION}\n```\n"
