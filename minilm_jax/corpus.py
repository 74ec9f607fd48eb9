"""A corpus on disk: text files read as a stream of rows, and embedding shards written and read back.

Inputs (`TextSource`): one or more files or globs, read in the order given (a glob's matches sorted):
- `.txt` (or any other name): UTF-8, one text per line;
- `.jsonl`: one JSON object a line, the text in `column` (default `text`);
- `.tsv` / `.csv`: a header line, the text in `column` (TSV unquoted, as our pairs files);
- `.parquet`: the text in `column`, read a record batch at a time.
Row i of the corpus is the i-th text over the files in that order. An empty (or all-blank) text, a
missing column or a non-string value is an error that names the file and the line (or row); the
embed command checks every row before it embeds any. With an id column (not for `.txt`), each row
also has an id: an integer (int64) or a non-empty string as the file holds it (always a string in
.tsv/.csv), every row's of one kind. Ids are stored as given; their uniqueness is not checked
(that would hold every id in memory).

Output layout (an embedded corpus folder, readable without this library):

    corpus.json                 the manifest (below)
    ranges.npy                  int8/uint8 only: float32 [2, dim] calibration minima and maxima
    shard-00000.npy ...         rows [start, stop) of the corpus: a [rows, width] array, `dtype`
    shard-00000.ids.npy ...     with --id-column only: those rows' ids, int64 or fixed-width unicode (<U)
    shard-00000.json ...        that shard's record: start, stop, sha256 of the .npy (and .ids.npy), model,
                                precision

corpus.json holds `format` ("minilm-jax-corpus/1"), `model` (path and `fingerprint`: sha256 of the
weights, configs and tokenizer), `precision`, `dim`, `dtype`, `width` (dim, or dim/8 bytes for the
packed bit precisions), `rows`, `shard_rows`, `inputs` (each file with its rows and column) and
their `fingerprint` (sha256 of every text, and id), `ranges` (int8/uint8), `ids` (with --id-column:
the column and "int64" or "str") and, once every shard is written, `complete: true` and `shards`
(file, start, stop, sha256; ids_file, ids_sha256). So, with numpy alone:

    m = json.load(open("corpus.json"))
    emb = np.concatenate([np.load(s["file"], mmap_mode="r") for s in m["shards"]])  # rows in order
    ids = np.concatenate([np.load(s["ids_file"]) for s in m["shards"]])  # with --id-column

Every file is written to a temporary name and renamed; a shard counts only once its .json record is
there, and that is written after its .npy. So a run killed at any moment loses at most the shards
in progress, and the same command goes on from there.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np

from minilm_jax.errors import UserError
from minilm_jax.quantize import PRECISIONS, stored_dtype, stored_width

FORMAT = "minilm-jax-corpus/1"
MANIFEST = "corpus.json"
RANGES = "ranges.npy"
_TABLE_EXTS = {".tsv": "\t", ".tab": "\t", ".csv": ","}


# ----------------------------------------------------------------------------- reading texts

def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files and globs -> the files, in the order given (each glob's matches sorted)."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{pattern} matches no file; check the pattern (quote it so the shell leaves it alone)")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise UserError(f"{pattern} is a folder; give files, or a glob such as '{pattern}/*.txt'")
        elif not os.path.exists(pattern):
            raise UserError(f"input file {pattern} does not exist; check the path")
        else:
            files.append(pattern)
    if len(set(map(os.path.abspath, files))) != len(files):
        raise UserError("an input file is named twice (directly or through a glob); give each file once")
    return files


def _kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in _TABLE_EXTS:
        return "table"
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(ext, "lines")


def _check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise UserError(f"{where}: the text is {type(text).__name__} {text!r:.40}, not a string; fix or remove the row")
    if not text.strip():
        raise UserError(f"{where}: the text is empty; remove the line (every row is embedded and keeps its row number)")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{where}: the text holds the lone surrogate {text[e.start]!r}; fix the encoding") from None
    return text


def _utf8_lines(path: str):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number} is not valid UTF-8 ({e.reason}); save the file as UTF-8") from None


def _check_id(value, where: str, id_column: str):
    """A row's id: an int (int64) or a non-empty string, as the file holds it."""
    if isinstance(value, str):
        if not value:
            raise UserError(f"{where}: the id in column {id_column!r} is empty; give every row an id")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not -2**63 <= value < 2**63:
            raise UserError(f"{where}: the id {value} in column {id_column!r} does not fit in int64; store it as a string")
        return value
    raise UserError(f"{where}: the id in column {id_column!r} is {type(value).__name__} {value!r:.40}; ids are "
                    "integers or strings")


def _lines(path: str, column: str, id_column: str | None) -> Iterator[tuple]:
    for number, line in _utf8_lines(path):
        yield _check_text(line.rstrip("\r\n"), f"{path} line {number}"), None


def _jsonl(path: str, column: str, id_column: str | None) -> Iterator[tuple]:
    for number, line in _utf8_lines(path):
        if not line.strip():
            raise UserError(f"{path} line {number} is empty; write one JSON object per line")
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e}); write one JSON object per line") from None
        for name, option in ((column, "--column"), (id_column, "--id-column")):
            if name is not None and (not isinstance(row, dict) or name not in row):
                found = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{path} line {number} has no column {name!r} (found {found}); name the column "
                                f"with {option}")
        where = f"{path} line {number}"
        yield (_check_text(row[column], f"{where}, column {column!r}"),
               None if id_column is None else _check_id(row[id_column], where, id_column))


def _table(path: str, column: str, id_column: str | None) -> Iterator[tuple]:
    delimiter = _TABLE_EXTS[os.path.splitext(path)[1].lower()]
    lines = (line for _, line in _utf8_lines(path))
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if header is None:
        raise UserError(f"{path} is empty; a {os.path.splitext(path)[1]} file needs a header line")
    header = [h.strip() for h in header]
    _check_columns(path, header, column, id_column)
    at = header.index(column)
    id_at = None if id_column is None else header.index(id_column)
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if len(row) != len(header):
            raise UserError(f"{where} has {len(row)} fields, the header {len(header)}; fix the row")
        yield _check_text(row[at], where), None if id_at is None else _check_id(row[id_at], where, id_column)


def _check_columns(path: str, names: Sequence[str], column: str, id_column: str | None) -> None:
    for name, option in ((column, "--column"), (id_column, "--id-column")):
        if name is not None and name not in names:
            raise UserError(f"{path} has no column {name!r} (found {', '.join(map(repr, names))}); name the column "
                            f"with {option}")


def _parquet(path: str, column: str, id_column: str | None) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - arrow's errors for a file that is not parquet vary
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    _check_columns(path, f.schema_arrow.names, column, id_column)
    row = 0
    for batch in f.iter_batches(batch_size=8192, columns=[column] + ([id_column] if id_column is not None else [])):
        ids = batch.column(1).to_pylist() if id_column is not None else [None] * batch.num_rows
        for text, id_ in zip(batch.column(0).to_pylist(), ids):
            where = f"{path} row {row}"
            yield _check_text(text, where), None if id_column is None else _check_id(id_, where, id_column)
            row += 1


@dataclasses.dataclass(frozen=True)
class TextSource:
    """The texts of `files` (see the module docstring), read as a stream; with `id_column`, each row's
    id beside its text (an int or a non-empty string, every row's id of one kind)."""

    files: tuple[str, ...]
    column: str = "text"
    id_column: str | None = None

    @classmethod
    def of(cls, patterns: Sequence[str], column: str = "text", id_column: str | None = None) -> "TextSource":
        source = cls(tuple(expand_inputs(patterns)), column, id_column)
        lines = [path for path in source.files if _kind(path) == "lines"]
        if id_column is not None and lines:
            raise UserError(f"{lines[0]} is a text file, one text a line, without columns; --id-column needs "
                            ".jsonl, .tsv, .csv or .parquet inputs")
        return source

    def file_rows(self, path: str) -> Iterator[tuple]:
        """(text, id) of each row of `path`; id is None without id_column."""
        reader = {"lines": _lines, "jsonl": _jsonl, "table": _table, "parquet": _parquet}[_kind(path)]
        return reader(path, self.column, self.id_column)

    def rows(self) -> Iterator[tuple]:
        for path in self.files:
            yield from self.file_rows(path)

    def texts(self) -> Iterator[str]:
        return (text for text, _ in self.rows())

    def scan(self) -> dict:
        """Every row checked; {rows, inputs: [{path, rows}], fingerprint: sha256 of the texts (and ids),
        ids: "int64" or "str" with id_column}."""
        digest = hashlib.sha256()
        inputs, total, id_kind = [], 0, None
        for path in self.files:
            rows = 0
            for text, id_ in self.file_rows(path):
                digest.update(text.encode("utf-8"))
                digest.update(b"\n")
                if self.id_column is not None:
                    kind = "str" if isinstance(id_, str) else "int64"
                    if id_kind is None:
                        id_kind = kind
                    elif kind != id_kind:
                        raise UserError(f"row {rows + 1} of {path}: the id {id_!r:.40} is {'a string' if kind == 'str' else 'an integer'}, "
                                        f"the ids before it {'strings' if id_kind == 'str' else 'integers'}; give every "
                                        "row an id of one kind")
                    digest.update(f"{kind}:{id_}\n".encode("utf-8", "surrogatepass"))
                rows += 1
            if rows == 0:
                raise UserError(f"{path} holds no text; remove it from the inputs")
            inputs.append({"path": os.path.abspath(path), "rows": rows,
                           **({"column": self.column} if _kind(path) != "lines" else {}),
                           **({"id_column": self.id_column} if self.id_column is not None else {})})
            total += rows
        return {"rows": total, "inputs": inputs, "fingerprint": digest.hexdigest(), "ids": id_kind}


def blocks(texts: Iterator[str], start: int, stop: int, size: int) -> Iterator[list[str]]:
    """Rows [start, stop) of a text stream that is at row `start`, in lists of at most `size`."""
    block = []
    for row in range(start, stop):
        block.append(next(texts))
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


# ----------------------------------------------------------------------------- model identity

def model_fingerprint(model) -> str:
    """sha256 of what decides a model's embeddings: configs, every weight (by name), tokenizer files."""
    import jax
    from flax import traverse_util

    digest = hashlib.sha256()
    digest.update(repr((model.config, model.sentence)).encode())
    for name, value in sorted(traverse_util.flatten_dict(jax.device_get(model.params), sep="/").items()):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    for name in sorted(model.tokenizer_files):
        digest.update(name.encode())
        digest.update(model.tokenizer_files[name])
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing

def atomic_write(path: str, data: bytes) -> None:
    """`data` at `path`, all or nothing: a temporary file in the same folder, flushed, then renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared corpus from its other readers
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress_oserror():
            os.remove(tmp)
        raise


def remove_unfinished(folder: str, names) -> int:
    """Remove the temporary files that atomic_write left for the files `names` (a set) in `folder` when its
    process was killed mid-write (only the writer of those files may call this); returns how many.
    One listing of the folder, whatever the number of names."""
    removed = 0
    for entry in os.scandir(folder):
        # atomic_write's temporary names: "." + name + "." + mkstemp's random characters (no dot) + ".tmp"
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.name[1:].rsplit(".", 2)[0] in names:
            with _suppress_oserror():
                os.remove(entry.path)
                removed += 1
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, OSError)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: str, damaged: str):
    """A JSON file's content, or a UserError: `path` is `damaged` (the message's end), with the reason."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} {damaged} ({e})") from None


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a corpus folder holds or will hold: everything in corpus.json but the shard list."""

    model_path: str
    model_fingerprint: str
    precision: str
    dim: int
    rows: int
    shard_rows: int
    inputs: tuple
    input_fingerprint: str
    ranges_sha256: str | None = None
    id_column: str | None = None  # each row's id is stored beside its embedding (shard-NNNNN.ids.npy)
    id_kind: str | None = None  # "int64" or "str"

    @property
    def dtype(self) -> np.dtype:
        return stored_dtype(self.precision)

    @property
    def width(self) -> int:
        return stored_width(self.precision, self.dim)

    @property
    def n_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_range(self, index: int) -> tuple[int, int]:
        return index * self.shard_rows, min(self.rows, (index + 1) * self.shard_rows)

    def manifest(self, shards: list | None = None) -> dict:
        out = {"format": FORMAT, "model": {"path": self.model_path, "fingerprint": self.model_fingerprint},
               "precision": self.precision, "dim": self.dim, "dtype": self.dtype.name, "width": self.width,
               "rows": self.rows, "shard_rows": self.shard_rows,
               "inputs": [dict(i) for i in self.inputs], "input_fingerprint": self.input_fingerprint}
        if self.ranges_sha256 is not None:
            out["ranges"] = {"file": RANGES, "sha256": self.ranges_sha256}
        if self.id_column is not None:
            out["ids"] = {"column": self.id_column, "dtype": self.id_kind}
        out["complete"] = shards is not None
        if shards is not None:
            out["shards"] = shards
        return out

    @classmethod
    def from_manifest(cls, m: dict) -> "Plan":
        return cls(m["model"]["path"], m["model"]["fingerprint"], m["precision"], int(m["dim"]), int(m["rows"]),
                   int(m["shard_rows"]), tuple(m["inputs"]), m["input_fingerprint"],
                   (m.get("ranges") or {}).get("sha256"), (m.get("ids") or {}).get("column"),
                   (m.get("ids") or {}).get("dtype"))


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    m = _read_json(path, "is not a readable corpus manifest: it is not ours or it is damaged")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{path} is not a minilm-jax corpus manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                        f"expected {FORMAT!r}); give another --output-dir")
    return m


def check_same_corpus(existing: Plan, wanted: Plan, folder: str) -> None:
    """A clear error when `folder` was embedded with another model, precision, inputs or shard size."""
    if existing.model_fingerprint != wanted.model_fingerprint:
        raise UserError(f"{folder} was embedded by another model ({existing.model_path}, fingerprint "
                        f"{existing.model_fingerprint[:12]}), not {wanted.model_path} ({wanted.model_fingerprint[:12]}); "
                        "use that model or another --output-dir")
    if existing.precision != wanted.precision:
        raise UserError(f"{folder} was embedded at precision {existing.precision}, not {wanted.precision}; ask for "
                        f"--precision {existing.precision} or use another --output-dir")
    if existing.id_column != wanted.id_column:
        had = f"with --id-column {existing.id_column}" if existing.id_column else "without --id-column"
        raise UserError(f"{folder} was embedded {had}; give the same --id-column or another --output-dir")
    if existing.input_fingerprint != wanted.input_fingerprint or existing.rows != wanted.rows:
        raise UserError(f"{folder} was embedded from other texts ({existing.rows} rows of "
                        f"{', '.join(i['path'] for i in existing.inputs)}); give the same inputs or another --output-dir")
    if existing.shard_rows != wanted.shard_rows:
        raise UserError(f"{folder} was written in shards of {existing.shard_rows} rows, not {wanted.shard_rows}; "
                        f"pass --shard-rows {existing.shard_rows} to go on")


def shard_record(folder: str, plan: Plan, index: int) -> dict | None:
    """The record of a complete shard, checked against the plan and the .npy's size; None if not written yet."""
    name = shard_name(index)
    record_path = os.path.join(folder, name + ".json")
    if not os.path.exists(record_path):
        return None
    record = _read_json(record_path, f"is damaged: delete it and {name}.npy to embed those rows again")
    start, stop = plan.shard_range(index)
    if (record.get("model_fingerprint") != plan.model_fingerprint or record.get("precision") != plan.precision
            or (record.get("start"), record.get("stop")) != (start, stop)):
        raise UserError(f"{record_path} is a foreign shard (model {str(record.get('model_fingerprint'))[:12]}, precision "
                        f"{record.get('precision')}, rows {record.get('start')}-{record.get('stop')}; this corpus wants "
                        f"{plan.model_fingerprint[:12]}, {plan.precision}, rows {start}-{stop}); move it away")
    for file, size in ((record["file"], record.get("bytes")), (record.get("ids_file"), record.get("ids_bytes"))):
        if file is None and plan.id_column is not None:
            raise UserError(f"{record_path} has no ids file, but this corpus keeps ids ({plan.id_column}); move it away")
        npy = os.path.join(folder, file) if file is not None else None
        if npy is not None and (not os.path.exists(npy) or os.path.getsize(npy) != size):
            raise UserError(f"{npy} is missing or has the wrong size for its record {record_path}; delete "
                            f"{name}.* to embed those rows again")
    return record


def ids_array(ids: Sequence, kind: str) -> np.ndarray:
    """A shard's ids as stored: int64, or fixed-width unicode (`<U` the longest id) for strings."""
    if kind == "int64":
        return np.asarray(ids, dtype=np.int64)
    return np.asarray(ids, dtype=f"<U{max(1, max(map(len, ids), default=1))}")


def write_shard(folder: str, plan: Plan, index: int, stored: np.ndarray, ids: np.ndarray | None = None) -> dict:
    """Shard `index` (its rows at the plan's precision), its ids (with an id column), then its record,
    each atomically."""
    start, stop = plan.shard_range(index)
    if stored.shape != (stop - start, plan.width) or stored.dtype != plan.dtype:
        raise AssertionError(f"shard {index}: {stored.dtype} {stored.shape}, expected {plan.dtype} {(stop - start, plan.width)}")
    if (ids is None) != (plan.id_column is None) or (ids is not None and ids.shape != (stop - start,)):
        raise AssertionError(f"shard {index}: ids {None if ids is None else ids.shape} for id column {plan.id_column}")
    name = shard_name(index)
    record = {}
    if ids is not None:
        id_data = npy_bytes(ids)
        atomic_write(os.path.join(folder, name + ".ids.npy"), id_data)
        record = {"ids_file": name + ".ids.npy", "ids_bytes": len(id_data),
                  "ids_sha256": hashlib.sha256(id_data).hexdigest()}
    data = npy_bytes(stored)
    atomic_write(os.path.join(folder, name + ".npy"), data)
    record = {"file": name + ".npy", "start": start, "stop": stop, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), **record, "model_fingerprint": plan.model_fingerprint,
              "precision": plan.precision}
    atomic_write(os.path.join(folder, name + ".json"), json.dumps(record).encode())
    return record


def write_manifest(folder: str, plan: Plan, shards: list | None = None) -> None:
    atomic_write(os.path.join(folder, MANIFEST), (json.dumps(plan.manifest(shards), indent=1) + "\n").encode())


# ----------------------------------------------------------------------------- reading back

@dataclasses.dataclass(frozen=True)
class Corpus:
    """An embedded corpus folder: its manifest and shards (memory-mapped, read one at a time)."""

    folder: str
    manifest: dict

    @classmethod
    def open(cls, folder: str, verify: bool = True) -> "Corpus":
        m = read_manifest(folder)
        if m is None:
            raise UserError(f"{folder} holds no {MANIFEST}; it is not an embedded corpus (embed_corpus.py writes one)")
        if not m.get("complete"):
            raise UserError(f"{folder} is not complete yet: run the same embed_corpus.py command again to finish it")
        corpus = cls(folder, m)
        expected = 0
        for s in m["shards"]:
            if s["start"] != expected:
                raise UserError(f"{folder}/{MANIFEST}: shard {s['file']} starts at row {s['start']}, expected {expected}")
            expected = s["stop"]
            files = [(s["file"], s["sha256"])] + ([(s["ids_file"], s["ids_sha256"])] if "ids_file" in s else [])
            if "ids" in m and "ids_file" not in s:
                raise UserError(f"{folder}/{MANIFEST}: shard {s['file']} has no ids file, but the corpus keeps ids")
            for file, sha256 in files:
                path = os.path.join(folder, file)
                if not os.path.exists(path):
                    raise UserError(f"{path} is missing; the corpus is incomplete")
                if verify and sha256_file(path) != sha256:
                    raise UserError(f"{path} is corrupt: its sha256 differs from {MANIFEST}'s; embed those rows again "
                                    f"(delete {shard_name(s['start'] // m['shard_rows'])}.*, then rerun the embed "
                                    "command)")
        if expected != m["rows"]:
            raise UserError(f"{folder}/{MANIFEST}: shards cover {expected} rows, the manifest says {m['rows']}")
        return corpus

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def id_column(self) -> str | None:
        """The input column whose values are the rows' ids (embed_corpus.py --id-column), or None."""
        return (self.manifest.get("ids") or {}).get("column")

    def ids_of(self, rows) -> np.ndarray:
        """The ids of corpus rows `rows` (an int array of any shape): int64, or str objects; the rows
        themselves when the corpus keeps no ids. Reads only the shards' ids files those rows are in."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.id_column is None:
            return rows.copy()
        strings = self.manifest["ids"]["dtype"] == "str"
        out = np.empty(rows.shape, dtype=object if strings else np.int64)
        shard_of = rows // int(self.manifest["shard_rows"])
        for index in np.unique(shard_of):
            s = self.manifest["shards"][int(index)]
            path = os.path.join(self.folder, s["ids_file"])
            try:
                ids = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise UserError(f"{path} is not a readable .npy file ({e})") from None
            if ids.shape != (s["stop"] - s["start"],) or ids.dtype.kind != ("U" if strings else "i"):
                raise UserError(f"{path} holds {ids.dtype} {ids.shape}, not the {s['stop'] - s['start']} ids of its "
                                "shard: a foreign or damaged ids file")
            here = shard_of == index
            out[here] = ids[rows[here] - s["start"]].tolist() if strings else ids[rows[here] - s["start"]]
        return out

    def ranges(self) -> np.ndarray | None:
        if "ranges" not in self.manifest:
            return None
        return np.load(os.path.join(self.folder, RANGES), allow_pickle=False)

    def shards(self) -> Iterator[np.ndarray]:
        """Each shard's stored rows, memory-mapped, in row order."""
        dtype, width = stored_dtype(self.precision), int(self.manifest["width"])
        for s in self.manifest["shards"]:
            path = os.path.join(self.folder, s["file"])
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise UserError(f"{path} is not a readable .npy file ({e})") from None
            if array.dtype != dtype or array.shape != (s["stop"] - s["start"], width):
                raise UserError(f"{path} holds {array.dtype} {array.shape}, not the manifest's {dtype} "
                                f"{(s['stop'] - s['start'], width)}: a foreign or damaged shard")
            yield array

    def stored(self) -> np.ndarray:
        """Every row, in one host array (memory: rows x width x itemsize)."""
        return np.concatenate(list(self.shards()), axis=0)


__all__ = ["Corpus", "PRECISIONS", "Plan", "TextSource"]
