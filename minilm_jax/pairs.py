"""Sentence-pair files (TSV, CSV: pandas; JSONL, parquet and hub datasets: `datasets`) -> validated `Pairs`.

Every row is checked: every text column must hold a string and the score a finite number; a bad
row is reported with its line number (data line numbers count the header as line 1). TSV is
read with quoting disabled: a sentence may start with or contain `"`.

Beyond (sentence1, sentence2, score), for the in-batch-negative losses (MultipleNegativesRankingLoss):
- `Columns(negatives=(...))`: hard-negative text columns, read and checked like the others
  (`--negative-column NAME`, repeatable);
- `score_required=False`: a file of (anchor, positive[, negatives]) without a score column is
  read with every score 1.0 (`Pairs.has_scores` is then False); a score column that is there
  is still read and checked;
- `positives_only=True`: of a pair-class file (label 1 = duplicate, 0 = not), only the label-1
  rows are kept; any other label is an error naming its line;
- `add_swapped=True`: every kept row is followed, after all of them, by its swap
  (sentence2, sentence1, same negatives, same score), for symmetric data such as duplicates.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile

import numpy as np

from minilm_jax.errors import UserError

_CSV_DELIMITERS = {".tsv": "\t", ".tab": "\t", ".csv": ","}


@dataclasses.dataclass(frozen=True)
class Columns:
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    score: str = "score"
    negatives: tuple = ()  # hard-negative text columns, in order

    def __post_init__(self):
        object.__setattr__(self, "negatives", tuple(self.negatives))
        names = self.texts() + [self.score]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise UserError(f"column {', '.join(map(repr, repeated))} is named twice among the sentence1, sentence2, "
                            "negative and score columns; give each role its own column")

    def texts(self) -> list[str]:
        """The text columns: sentence1 (anchor), sentence2 (positive), then the negatives."""
        return [self.sentence1, self.sentence2, *self.negatives]


@dataclasses.dataclass(frozen=True)
class Pairs:
    sentence1: list
    sentence2: list
    scores: np.ndarray  # float64, as read (all 1.0 when the file had no score column: has_scores False)
    source: str = ""
    negatives: tuple = ()  # one list of texts per hard-negative column
    has_scores: bool = True

    def __len__(self) -> int:
        return len(self.scores)

    def columns(self) -> list[list]:
        """The text columns, as the losses take them: sentence1, sentence2, then the negatives."""
        return [self.sentence1, self.sentence2, *self.negatives]

    def select(self, indices) -> "Pairs":
        return dataclasses.replace(
            self, sentence1=[self.sentence1[i] for i in indices], sentence2=[self.sentence2[i] for i in indices],
            scores=self.scores[np.asarray(indices, dtype=np.int64)],
            negatives=tuple([column[i] for i in indices] for column in self.negatives))

    def swapped(self) -> "Pairs":
        """Every row followed (after all of them) by its swap: (sentence2, sentence1, negatives, score)."""
        return dataclasses.replace(self, sentence1=self.sentence1 + self.sentence2,
                                   sentence2=self.sentence2 + self.sentence1,
                                   scores=np.concatenate([self.scores, self.scores]),
                                   negatives=tuple(column + column for column in self.negatives))


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: its readers log "Failed to read file ..." before raising, and we turn the
    # exception itself into the one error line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _first_line_columns(path: str, delimiter: str) -> list[str]:
    with open(path, "rb") as f:
        return header_columns(f.readline(), path, delimiter)


def header_columns(head: bytes, path: str, delimiter: str) -> list[str]:
    """The column names of a delimited file's first line (its bytes), checked."""
    if not head.strip():
        raise UserError(f"{path} is empty; a pairs file needs a header line and at least one row")
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} line 1 is not valid UTF-8 ({e.reason}); save the file as UTF-8") from None
    return [c.strip() for c in text.rstrip("\r\n").split(delimiter)]


def _has_rows_after_header(path: str) -> bool:
    with open(path, "rb") as f:
        f.readline()
        return any(line.strip() for line in f)


def _unwrap(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def read_table(path: str, columns: Columns, score_required: bool = True) -> tuple[dict[str, list], int]:
    """The text and score columns of a local file as lists of raw values, and the line number of its
    first row. Without score_required, a missing score column is simply not in the result."""
    if not os.path.exists(path):
        raise UserError(f"pairs file {path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a .tsv, .csv, .jsonl or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _CSV_DELIMITERS and ext not in (".jsonl", ".json", ".parquet"):
        raise UserError(f"{path}: unknown file type {ext or '(none)'}; use .tsv, .csv, .jsonl or .parquet")
    if ext not in _CSV_DELIMITERS and os.path.getsize(path) == 0:  # a delimited file's header is checked below
        raise UserError(f"{path} is empty; a pairs file needs at least one row")
    try:
        if ext in _CSV_DELIMITERS:
            table, first_line = _read_delimited(path, columns, score_required, _CSV_DELIMITERS[ext]), 2
        else:
            table, first_line = _read_with_datasets(path, "parquet" if ext == ".parquet" else "json"), 1
    except UserError:
        raise
    except Exception as e:  # pandas/arrow parse errors, often wrapped by datasets: show the root cause
        root = _unwrap(e)
        if isinstance(root, UnicodeDecodeError):
            raise UserError(f"{path} is not valid UTF-8 ({root.reason} at byte {root.start}); "
                            "save the file as UTF-8") from None
        if ext in (".jsonl", ".json"):  # arrow's reader says "Trailing data" for a bad line: find the line
            _check_json_lines(path)
        raise UserError(f"{path} could not be parsed: {str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__}"
                        "; check that every row has the same columns") from None
    wanted = _wanted(columns, list(table), score_required)
    _check_columns(path, list(table), wanted)
    return {name: table[name] for name in wanted}, first_line


def _read_delimited(path: str, columns: Columns, score_required: bool, delimiter: str) -> dict[str, list]:
    """A TSV/CSV file's columns as lists of strings, parsed by pandas exactly as `datasets`' csv
    builder parses it (the same read_csv arguments, every column as text), without the builder: it
    cost 1-2 s of a short run's start for a few thousand rows, pandas 15 ms."""
    import pandas

    header = _first_line_columns(path, delimiter)
    _check_columns(path, header, _wanted(columns, header, score_required))
    if not _has_rows_after_header(path):
        raise UserError(f"{path} has a header but no rows; add at least one pair")
    # datasets.packaged_modules.csv's read_csv arguments for these options (its defaults elsewhere).
    reader = pandas.read_csv(path, sep=delimiter, header="infer", dtype={name: object for name in header},
                             keep_default_na=False, na_filter=False, skip_blank_lines=True, quotechar='"',
                             quoting=3 if delimiter == "\t" else 0, doublequote=True, encoding="utf-8-sig",
                             encoding_errors="strict", on_bad_lines="error", iterator=True, chunksize=10_000)
    with reader:
        frame = pandas.concat(list(reader), ignore_index=True)
    return {name: frame[name].tolist() for name in frame.columns}


def _read_with_datasets(path: str, builder: str) -> dict[str, list]:
    datasets = _quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="minilm-jax-datasets-") as cache:
        table = datasets.load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache,
                                      keep_in_memory=True)
        return {name: table[name] for name in table.column_names}


def _check_json_lines(path: str) -> None:
    """A UserError naming the first line of a JSON Lines file that is not one JSON object of valid
    Unicode text (arrow's reader refuses an escaped lone surrogate such as "\\udce9" with
    "Trailing data"); returns if every line is fine."""
    import json

    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {number} is not valid JSON ({e}); write one JSON object per line") from None
            for key, value in (row.items() if isinstance(row, dict) else ()):
                if isinstance(value, str):
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise UserError(f"{path} line {number}: {key!r} holds the lone surrogate {value[e.start]!r} at "
                                        f"character {e.start} (an escaped half of a surrogate pair); write the character "
                                        "itself or its whole pair, or remove it") from None


def _wanted(columns: Columns, found: list[str], score_required: bool) -> list[str]:
    """The columns to read: the text columns, and the score column if required or present."""
    return columns.texts() + ([columns.score] if score_required or columns.score in found else [])


def _check_columns(path: str, found: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(f"{path} has no column {', '.join(repr(m) for m in missing)} (found {', '.join(map(repr, found))}); "
                        "rename the header or select columns with --sentence1-column/--sentence2-column/--score-column"
                        "/--negative-column (or \"columns\" in a data config)")


def _parse_score(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise UserError(f"{where}: score {value!r:.40} is not a number; fix or remove the row") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: score {value!r} is not finite; fix or remove the row")
    return number


def to_pairs(raw: dict[str, list], columns: Columns, source: str, first_line: int,
             unit_interval: bool = False, score_scale: float = 1.0, *, positives_only: bool = False,
             add_swapped: bool = False) -> Pairs:
    """Validated Pairs from raw columns (`raw` lacks the score column when the file has none)."""
    names = columns.texts()
    texts = [raw[name] for name in names]
    has_scores = columns.score in raw
    n = len(texts[0])
    if not n:
        raise UserError(f"{source} has a header but no rows; add at least one pair")
    if positives_only and not has_scores:
        raise UserError(f"{source} has no label column {columns.score!r}; positives_only keeps the rows labelled 1 "
                        "of a pair-class file: name its label column with --score-column")
    out = np.ones(n, dtype=np.float64)
    label_one = np.zeros(n, dtype=bool)
    for i in range(n):
        where = f"{source} line {first_line + i}"
        for name, column in zip(names, texts):
            text = column[i]
            if not isinstance(text, str):
                raise UserError(f"{where}: {name} is {type(text).__name__} {text!r:.40}, not text; fix the row")
        if not has_scores:
            continue
        value = raw[columns.score][i]
        number = _parse_score(value, where)
        if positives_only and number not in (0.0, 1.0):
            raise UserError(f"{where}: label {value!r:.40} is not 0 or 1; positives_only keeps the rows labelled 1 "
                            "(duplicates) of a pair-class file")
        label_one[i] = number == 1.0
        out[i] = number / score_scale
        if unit_interval and not 0.0 <= out[i] <= 1.0:
            raise UserError(f"{where}: score {value} is outside [0, 1] (CosineSimilarityLoss needs labels in [0, 1]); "
                            "for 0-5 STS scores pass --score-scale 5")
    pairs = Pairs(list(texts[0]), list(texts[1]), out, source, tuple(list(t) for t in texts[2:]), has_scores)
    if positives_only:
        keep = np.flatnonzero(label_one)
        if not len(keep):
            raise UserError(f"{source} has no row labelled 1 in column {columns.score!r}; positives_only keeps the "
                            "duplicates (label 1) of a pair-class file")
        pairs = pairs.select(keep)
    return pairs.swapped() if add_swapped else pairs


def load_pairs(path: str, columns: Columns = Columns(), unit_interval: bool = False,
               score_scale: float = 1.0, *, score_required: bool = True, positives_only: bool = False,
               add_swapped: bool = False) -> Pairs:
    """A pairs file, validated row by row (the options: see the module docstring). A URL
    (hf://datasets/..., s3://, https://: an evaluation file is small) is fetched to a temporary
    folder first and read from there; errors name the URL."""
    from minilm_jax.input.sources import is_url

    if is_url(path):
        return _load_remote_pairs(path, columns, unit_interval, score_scale, score_required=score_required,
                                  positives_only=positives_only, add_swapped=add_swapped)
    raw, first_line = read_table(path, columns, score_required=score_required and not positives_only)
    return to_pairs(raw, columns, path, first_line, unit_interval, score_scale, positives_only=positives_only,
                    add_swapped=add_swapped)


def _load_remote_pairs(url: str, columns: Columns, unit_interval: bool, score_scale: float, **options) -> Pairs:
    from minilm_jax.input.sources import open_file

    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="minilm-jax-pairs-") as folder:
        local = os.path.join(folder, name)
        with open_file(url) as source, open(local, "wb") as copy:
            shutil.copyfileobj(source, copy, 8 << 20)
        try:
            pairs = load_pairs(local, columns, unit_interval, score_scale, **options)
        except UserError as e:
            raise UserError(str(e).replace(local, url)) from None
    return dataclasses.replace(pairs, source=url)


def load_hub_pairs(name: str, subset: str | None, split: str, columns: Columns, unit_interval: bool = False,
                   score_scale: float = 1.0, *, score_required: bool = True, positives_only: bool = False,
                   add_swapped: bool = False) -> Pairs:
    """A split of a Hugging Face hub dataset (needs network or a warm datasets cache)."""
    datasets = _quiet_datasets()
    try:
        table = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise UserError(f"could not load dataset {name}{'/' + subset if subset else ''} split {split} "
                        f"({type(_unwrap(e)).__name__}: {str(_unwrap(e))[:120]}); offline, pass --train-file/--eval-file") from None
    wanted = _wanted(columns, table.column_names, score_required and not positives_only)
    _check_columns(name, table.column_names, wanted)
    raw = {c: table[c] for c in wanted}
    return to_pairs(raw, columns, name, 0, unit_interval, score_scale, positives_only=positives_only,
                    add_swapped=add_swapped)
