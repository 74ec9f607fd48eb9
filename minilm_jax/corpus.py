"""A corpus on disk: text files read as a stream of rows, and embedding shards written and read back.

Inputs (`TextSource`): one or more files or globs, read in the order given (a glob's matches sorted):
- `.txt` (or any other name): UTF-8, one text per line;
- `.jsonl`: one JSON object a line, the text in `column` (default `text`);
- `.tsv` / `.csv`: a header line, the text in `column` (TSV unquoted, as our pairs files);
- `.parquet`: the text in `column`, read a record batch at a time.
Row i of the corpus is the i-th text over the files in that order. An empty (or all-blank) text, a
missing column or a non-string value is an error that names the file and the line (or row); the
embed command checks every row before it embeds any.

Output layout (an embedded corpus folder, readable without this library):

    corpus.json                 the manifest (below)
    ranges.npy                  int8/uint8 only: float32 [2, dim] calibration minima and maxima
    shard-00000.npy ...         rows [start, stop) of the corpus: a [rows, width] array, `dtype`
    shard-00000.json ...        that shard's record: start, stop, sha256 of the .npy, model, precision

corpus.json holds `format` ("minilm-jax-corpus/1"), `model` (path and `fingerprint`: sha256 of the
weights, configs and tokenizer), `precision`, `dim`, `dtype`, `width` (dim, or dim/8 bytes for the
packed bit precisions), `rows`, `shard_rows`, `inputs` (each file with its rows and column) and
their `fingerprint` (sha256 of every text), `ranges` (int8/uint8) and, once every shard is written,
`complete: true` and `shards` (file, start, stop, sha256). So, with numpy alone:

    m = json.load(open("corpus.json"))
    emb = np.concatenate([np.load(s["file"], mmap_mode="r") for s in m["shards"]])  # rows in order

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


def _lines(path: str) -> Iterator[str]:
    for number, line in _utf8_lines(path):
        yield _check_text(line.rstrip("\r\n"), f"{path} line {number}")


def _jsonl(path: str, column: str) -> Iterator[str]:
    for number, line in _utf8_lines(path):
        if not line.strip():
            raise UserError(f"{path} line {number} is empty; write one JSON object per line")
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path} line {number} is not valid JSON ({e}); write one JSON object per line") from None
        if not isinstance(row, dict) or column not in row:
            found = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{path} line {number} has no column {column!r} (found {found}); name the text column "
                            "with --column")
        yield _check_text(row[column], f"{path} line {number}, column {column!r}")


def _table(path: str, column: str) -> Iterator[str]:
    delimiter = _TABLE_EXTS[os.path.splitext(path)[1].lower()]
    lines = (line for _, line in _utf8_lines(path))
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if header is None:
        raise UserError(f"{path} is empty; a {os.path.splitext(path)[1]} file needs a header line")
    header = [h.strip() for h in header]
    if column not in header:
        raise UserError(f"{path} has no column {column!r} (found {', '.join(map(repr, header))}); name the text "
                        "column with --column")
    at = header.index(column)
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if len(row) != len(header):
            raise UserError(f"{where} has {len(row)} fields, the header {len(header)}; fix the row")
        yield _check_text(row[at], where)


def _parquet(path: str, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - arrow's errors for a file that is not parquet vary
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    names = f.schema_arrow.names
    if column not in names:
        raise UserError(f"{path} has no column {column!r} (found {', '.join(map(repr, names))}); name the text column "
                        "with --column")
    row = 0
    for batch in f.iter_batches(batch_size=8192, columns=[column]):
        for text in batch.column(0).to_pylist():
            yield _check_text(text, f"{path} row {row}")
            row += 1


@dataclasses.dataclass(frozen=True)
class TextSource:
    """The texts of `files` (see the module docstring), read as a stream."""

    files: tuple[str, ...]
    column: str = "text"

    @classmethod
    def of(cls, patterns: Sequence[str], column: str = "text") -> "TextSource":
        return cls(tuple(expand_inputs(patterns)), column)

    def file_texts(self, path: str) -> Iterator[str]:
        kind = _kind(path)
        if kind == "lines":
            return _lines(path)
        if kind == "jsonl":
            return _jsonl(path, self.column)
        if kind == "table":
            return _table(path, self.column)
        return _parquet(path, self.column)

    def texts(self) -> Iterator[str]:
        for path in self.files:
            yield from self.file_texts(path)

    def scan(self) -> dict:
        """Every row checked; {rows, inputs: [{path, rows}], fingerprint: sha256 of the texts}."""
        digest = hashlib.sha256()
        inputs, total = [], 0
        for path in self.files:
            rows = 0
            for text in self.file_texts(path):
                digest.update(text.encode("utf-8"))
                digest.update(b"\n")
                rows += 1
            if rows == 0:
                raise UserError(f"{path} holds no text; remove it from the inputs")
            inputs.append({"path": os.path.abspath(path), "rows": rows,
                           **({"column": self.column} if _kind(path) != "lines" else {})})
            total += rows
        return {"rows": total, "inputs": inputs, "fingerprint": digest.hexdigest()}


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
        out["complete"] = shards is not None
        if shards is not None:
            out["shards"] = shards
        return out

    @classmethod
    def from_manifest(cls, m: dict) -> "Plan":
        return cls(m["model"]["path"], m["model"]["fingerprint"], m["precision"], int(m["dim"]), int(m["rows"]),
                   int(m["shard_rows"]), tuple(m["inputs"]), m["input_fingerprint"],
                   (m.get("ranges") or {}).get("sha256"))


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
    npy = os.path.join(folder, record["file"])
    if not os.path.exists(npy) or os.path.getsize(npy) != record.get("bytes"):
        raise UserError(f"{npy} is missing or has the wrong size for its record {record_path}; delete both to embed "
                        "those rows again")
    return record


def write_shard(folder: str, plan: Plan, index: int, stored: np.ndarray) -> dict:
    """Shard `index` (its rows at the plan's precision) and then its record, each atomically."""
    start, stop = plan.shard_range(index)
    if stored.shape != (stop - start, plan.width) or stored.dtype != plan.dtype:
        raise AssertionError(f"shard {index}: {stored.dtype} {stored.shape}, expected {plan.dtype} {(stop - start, plan.width)}")
    name = shard_name(index)
    data = npy_bytes(stored)
    atomic_write(os.path.join(folder, name + ".npy"), data)
    record = {"file": name + ".npy", "start": start, "stop": stop, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "model_fingerprint": plan.model_fingerprint,
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
            path = os.path.join(folder, s["file"])
            if not os.path.exists(path):
                raise UserError(f"{path} is missing; the corpus is incomplete")
            if verify and sha256_file(path) != s["sha256"]:
                raise UserError(f"{path} is corrupt: its sha256 differs from {MANIFEST}'s; embed those rows again "
                                f"(delete it and {os.path.splitext(s['file'])[0]}.json, then rerun the embed command)")
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
