"""Sentence-pair files (TSV, CSV, JSONL, parquet) and hub datasets -> validated `Pairs`, through `datasets`.

Every row is checked: both sentences must be strings and the score a finite number; a bad
row is reported with its line number (data line numbers count the header as line 1). TSV is
read with quoting disabled: a sentence may start with or contain `"`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import numpy as np

from minilm_jax.errors import UserError

_CSV_DELIMITERS = {".tsv": "\t", ".tab": "\t", ".csv": ","}


@dataclasses.dataclass(frozen=True)
class Columns:
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    score: str = "score"


@dataclasses.dataclass(frozen=True)
class Pairs:
    sentence1: list
    sentence2: list
    scores: np.ndarray  # float64, as read
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, indices) -> "Pairs":
        return Pairs([self.sentence1[i] for i in indices], [self.sentence2[i] for i in indices],
                     self.scores[np.asarray(indices, dtype=np.int64)], self.source)


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: its readers log "Failed to read file ..." before raising, and we turn the
    # exception itself into the one error line.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _first_line_columns(path: str, delimiter: str) -> list[str]:
    with open(path, "rb") as f:
        head = f.readline()
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


def read_table(path: str, columns: Columns) -> tuple[dict[str, list], int]:
    """The three columns of a local file as lists of raw values, and the line number of its first row."""
    if not os.path.exists(path):
        raise UserError(f"pairs file {path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give a .tsv, .csv, .jsonl or .parquet file")
    ext = os.path.splitext(path)[1].lower()
    datasets = _quiet_datasets()
    wanted = [columns.sentence1, columns.sentence2, columns.score]
    with tempfile.TemporaryDirectory(prefix="minilm-jax-datasets-") as cache:
        if ext in _CSV_DELIMITERS:
            delimiter = _CSV_DELIMITERS[ext]
            header = _first_line_columns(path, delimiter)
            _check_columns(path, header, wanted)
            if not _has_rows_after_header(path):  # datasets would fail with "corresponds to no data"
                raise UserError(f"{path} has a header but no rows; add at least one pair")
            features = datasets.Features({name: datasets.Value("string") for name in header})
            kwargs = dict(delimiter=delimiter, features=features, keep_default_na=False, na_filter=False,
                          encoding="utf-8-sig")
            if delimiter == "\t":
                kwargs["quoting"] = 3  # csv.QUOTE_NONE
            builder, first_line = "csv", 2
        elif ext in (".jsonl", ".json"):
            builder, kwargs, first_line = "json", {}, 1
        elif ext == ".parquet":
            builder, kwargs, first_line = "parquet", {}, 1
        else:
            raise UserError(f"{path}: unknown file type {ext or '(none)'}; use .tsv, .csv, .jsonl or .parquet")
        if os.path.getsize(path) == 0:
            raise UserError(f"{path} is empty; a pairs file needs at least one row")
        try:
            table = datasets.load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache,
                                          keep_in_memory=True, **kwargs)
        except Exception as e:  # datasets wraps pandas/arrow parse errors; show the root cause
            root = _unwrap(e)
            if isinstance(root, UnicodeDecodeError):
                raise UserError(f"{path} is not valid UTF-8 ({root.reason} at byte {root.start}); "
                                "save the file as UTF-8") from None
            raise UserError(f"{path} could not be parsed: {str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__}"
                            "; check that every row has the same columns") from None
        _check_columns(path, table.column_names, wanted)
        return {name: table[name] for name in wanted}, first_line


def _check_columns(path: str, found: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(f"{path} has no column {', '.join(repr(m) for m in missing)} (found {', '.join(map(repr, found))}); "
                        "rename the header or select columns with --sentence1-column/--sentence2-column/--score-column")


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
             unit_interval: bool = False, score_scale: float = 1.0) -> Pairs:
    s1, s2, scores = raw[columns.sentence1], raw[columns.sentence2], raw[columns.score]
    if not scores:
        raise UserError(f"{source} has a header but no rows; add at least one pair")
    out = np.empty(len(scores), dtype=np.float64)
    for i, (a, b, value) in enumerate(zip(s1, s2, scores)):
        where = f"{source} line {first_line + i}"
        for name, text in ((columns.sentence1, a), (columns.sentence2, b)):
            if not isinstance(text, str):
                raise UserError(f"{where}: {name} is {type(text).__name__} {text!r:.40}, not text; fix the row")
        out[i] = _parse_score(value, where) / score_scale
        if unit_interval and not 0.0 <= out[i] <= 1.0:
            raise UserError(f"{where}: score {value} is outside [0, 1] (CosineSimilarityLoss needs labels in [0, 1]); "
                            "for 0-5 STS scores pass --score-scale 5")
    return Pairs(list(s1), list(s2), out, source)


def load_pairs(path: str, columns: Columns = Columns(), unit_interval: bool = False,
               score_scale: float = 1.0) -> Pairs:
    """A local pairs file, validated row by row."""
    raw, first_line = read_table(path, columns)
    return to_pairs(raw, columns, path, first_line, unit_interval, score_scale)


def load_hub_pairs(name: str, subset: str | None, split: str, columns: Columns, unit_interval: bool = False,
                   score_scale: float = 1.0) -> Pairs:
    """A split of a Hugging Face hub dataset (needs network or a warm datasets cache)."""
    datasets = _quiet_datasets()
    try:
        table = datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        raise UserError(f"could not load dataset {name}{'/' + subset if subset else ''} split {split} "
                        f"({type(_unwrap(e)).__name__}: {str(_unwrap(e))[:120]}); offline, pass --train-file/--eval-file") from None
    _check_columns(name, table.column_names, [columns.sentence1, columns.sentence2, columns.score])
    raw = {c: table[c] for c in (columns.sentence1, columns.sentence2, columns.score)}
    return to_pairs(raw, columns, name, 0, unit_interval, score_scale)
