"""Training files -> pieces -> rows, read as a stream: never a whole file in memory.

A dataset's files (paths and glob patterns) are cut into *pieces*, the unit that devices share out:
- `.tsv`/`.tab` and `.jsonl`: byte ranges of whole lines (a line belongs to the piece its first byte
  falls in), so that a host reads only the bytes of its own pieces;
- `.parquet`: row ranges (a range reads only the row groups it overlaps);
- `.csv` (a quoted field may hold a newline) and any `.gz`: whole files, as they cannot be entered in
  the middle.
Each splittable file is cut into a multiple of the run's shard count (pipeline.py), so that every
shard gets an equal share of its bytes (rows) whatever the number of files.

Rows are (text columns..., score): sentence1, sentence2, any negatives, then the score as a float
(1.0 where the file has no score column and the loss needs none). A bad row is an error naming
the file and its line (the header is line 1 of a TSV/CSV file; JSON Lines count from 1; a parquet
row is named by its row number). TSV is read with quoting disabled, as everywhere in this library.

Positions inside a piece are byte offsets (lines) or row numbers (whole files, parquet), so that a
stream can start reading again exactly where a checkpoint says.

A file may also be an fsspec URL (`hf://datasets/NAME/...` for a Hugging Face hub dataset's files,
`s3://`, `gs://`, `https://`, ...; globs where the filesystem lists): it is read the same way, by byte
ranges and parquet row groups, so each host fetches only its own pieces.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import io
import json
import math
import os
import threading
from typing import Iterator, Sequence

import numpy as np

from minilm_jax.errors import UserError
from minilm_jax.pairs import Columns, _check_columns, _parse_score, _wanted, header_columns

# The size of a byte-range piece: large enough that pieces are few (a 36-million-pair Quora file,
# 3.8 GB, is 57 of them), small enough that shuffling their order each epoch mixes a large file.
PIECE_BYTES = 64 << 20
READ_BYTES = 8 << 20  # a line reader's read size
BLANK = (b"", b"\r")  # lines skipped (as pandas skips blank lines); any other line is a row


@dataclasses.dataclass(frozen=True)
class FileFormat:
    path: str
    kind: str  # "tsv", "csv", "jsonl" or "parquet"
    gzipped: bool

    @property
    def splittable(self) -> bool:
        return not self.gzipped and self.kind in ("tsv", "jsonl", "parquet")


def is_url(path: str) -> bool:
    """A file named by an fsspec URL rather than a local path."""
    return "://" in path


def _filesystem(path: str):
    """(fsspec filesystem, its path) of a URL."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(path)
    except (ImportError, ValueError) as e:
        raise UserError(f"{path}: no filesystem serves this URL ({e}); install the package for its protocol "
                        "(huggingface_hub for hf://, s3fs, gcsfs, ...)") from None


def open_file(path: str):
    """The file at `path` (a local path or a URL), opened for reading bytes."""
    try:
        if not is_url(path):
            return open(path, "rb")
        fs, inner = _filesystem(path)
        return fs.open(inner, "rb")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or a remote filesystem's own errors: one line naming the file
        reason = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise UserError(f"{path} cannot be read ({reason}); check the file") from None


def file_size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, inner = _filesystem(path)
    return int(fs.size(inner))


def file_format(path: str) -> FileFormat:
    name = (path.split("?", 1)[0] if is_url(path) else path).lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    kinds = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    if ext not in kinds or (gzipped and ext == ".parquet"):
        raise UserError(f"{path}: unknown file type {ext or '(none)'}{'.gz' if gzipped else ''}; training files are "
                        ".tsv, .csv, .jsonl (each also .gz) or .parquet")
    return FileFormat(path, kinds[ext], gzipped)


def expand_files(patterns: Sequence[str], dataset: str) -> tuple[str, ...]:
    """Every file the patterns name, in order (a glob's matches sorted), each once."""
    files: list[str] = []
    for pattern in patterns:
        if is_url(pattern):
            found = _expand_url(pattern, dataset)
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise UserError(f"dataset {dataset}: the pattern {pattern!r} matches no file; check the path "
                                f"(relative paths start at {os.getcwd()})")
        else:
            if not os.path.exists(pattern):
                raise UserError(f"dataset {dataset}: training file {pattern} does not exist; check the path")
            if os.path.isdir(pattern):
                raise UserError(f"dataset {dataset}: {pattern} is a folder; give files or a glob such as "
                                f"{os.path.join(pattern, '*.jsonl.gz')}")
            found = [pattern]
        for path in found:
            file_format(path)
            if not is_url(path) and not os.access(path, os.R_OK):
                raise UserError(f"dataset {dataset}: {path} cannot be read (permission denied)")
            if path not in files:
                files.append(path)
    if not files:
        raise UserError(f"dataset {dataset} names no training file")
    return tuple(files)


def _expand_url(pattern: str, dataset: str) -> list[str]:
    fs, inner = _filesystem(pattern)
    try:
        if glob.has_magic(inner):
            listed = fs.glob(inner, detail=True)
            found = sorted(fs.unstrip_protocol(p) for p, info in listed.items() if info.get("type") == "file")
            if not found:
                raise UserError(f"dataset {dataset}: the pattern {pattern!r} matches no file; check the URL")
            return found
        if not fs.exists(inner):
            raise UserError(f"dataset {dataset}: training file {pattern} does not exist; check the URL")
        if fs.isdir(inner):
            raise UserError(f"dataset {dataset}: {pattern} is a folder; give files or a glob such as "
                            f"{pattern.rstrip('/')}/*.parquet")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a remote filesystem's errors (no network, no access): one line
        raise UserError(f"dataset {dataset}: {pattern} cannot be listed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the URL and the network") from None
    return [pattern]


@dataclasses.dataclass(frozen=True)
class Piece:
    """A part of one file: bytes [start, end) for lines, rows [start, end) for parquet, the whole
    file (0, -1) otherwise."""

    path: str
    start: int
    end: int


# ----------------------------------------------------------------------------- the columns of a file

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a file's wanted columns are: for TSV/CSV their field positions; for JSON Lines and
    parquet their names."""

    fmt: FileFormat
    wanted: tuple[str, ...]  # text columns, then the score column if read
    positions: tuple[int, ...] = ()  # TSV/CSV
    n_fields: int = 0  # TSV/CSV: fields in the header
    has_score: bool = True


def _open_binary(fmt: FileFormat):
    f = open_file(fmt.path)
    return gzip.open(f, "rb") if fmt.gzipped else f


def _header_fields(fmt: FileFormat) -> list[str]:
    with _open_binary(fmt) as f:
        try:
            head = f.readline()
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"{fmt.path} cannot be read ({e}); check that the file is complete") from None
    names = header_columns(head, fmt.path, "\t")  # checked: not empty, UTF-8
    if fmt.kind == "csv":  # a CSV header may quote its names
        import csv

        names = [c.strip() for c in next(csv.reader([head.decode("utf-8-sig").rstrip("\r\n")]))]
    return names


def layout_of(path: str, columns: Columns, score_required: bool) -> Layout:
    """Check that `path` holds the columns (reading only its header, schema or first JSON object; a
    JSON line without them is reported when it is read)."""
    fmt = file_format(path)
    if fmt.kind in ("tsv", "csv"):
        found = _header_fields(fmt)
    elif fmt.kind == "parquet":
        found = _parquet(path).schema_arrow.names
    else:
        found = list(_first_json_object(fmt))
    wanted = tuple(_wanted(columns, found, score_required))
    _check_columns(path, found, wanted)
    positions = tuple(found.index(c) for c in wanted) if fmt.kind in ("tsv", "csv") else ()
    return Layout(fmt, wanted, positions, len(found) if positions else 0, columns.score in wanted)


def _first_json_object(fmt: FileFormat) -> dict:
    with _open_binary(fmt) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                return _json_row(line, fmt.path, number)
    raise UserError(f"{fmt.path} is empty; a JSON Lines file needs at least one row")


def _json_row(line: bytes, path: str, number) -> dict:
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} line {number} is not valid JSON ({e}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise UserError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; write one object per line")
    return row


def _parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(open_file(path) if is_url(path) else path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - arrow's errors: one line naming the file
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "check that the file is complete") from None


# ----------------------------------------------------------------------------- pieces

def pieces_of(path: str, n_shards: int) -> list[Piece]:
    """`path` cut into pieces: a multiple of n_shards for a splittable file (piece i goes to shard
    i % n_shards), the whole file otherwise."""
    fmt = file_format(path)
    if not fmt.splittable:
        return [Piece(path, 0, -1)]
    if fmt.kind == "parquet":
        rows = _parquet(path).metadata.num_rows
        cuts = _cuts(rows, rows * 100, n_shards)  # parquet rows: assume ~100 bytes each for the piece count
        return [Piece(path, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    size = file_size(path)
    return [Piece(path, a, b) for a, b in zip(*_line_cuts(path, size, n_shards))]


def _cuts(total: int, nbytes: int, n_shards: int) -> list[int]:
    n = n_shards * max(1, math.ceil(nbytes / (PIECE_BYTES * n_shards)))
    return [total * i // n for i in range(n + 1)]


def _line_cuts(path: str, size: int, n_shards: int) -> tuple[list[int], list[int]]:
    """Byte ranges of whole lines: each cut moved forward to the start of the next line (the header
    line, if any, stays in the first piece and is skipped when read)."""
    cuts = _cuts(size, size, n_shards)
    with open_file(path) as f:
        aligned = [0]
        for c in cuts[1:-1]:
            f.seek(max(c - 1, 0))
            f.readline()  # to the end of the line holding byte c - 1: the next line starts at or after c
            aligned.append(max(f.tell(), aligned[-1]))
        aligned.append(size)
    return aligned[:-1], aligned[1:]


# ----------------------------------------------------------------------------- reading rows

class _OpenFiles:
    """Files held open for reading lines again by position (Reader.line): the most recently used
    few, shared by every stream of the process, so that many files and many streams do not run the
    process out of file descriptors."""

    def __init__(self, most: int = 64):
        self._files: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock, self._most = threading.Lock(), most

    def pread(self, path: str, length: int, offset: int) -> bytes:
        with self._lock:
            f = self._files.get(path)
            if f is None:
                f = open_file(path)
                while len(self._files) >= self._most:
                    self._files.popitem(last=False)[1].close()
                self._files[path] = f
            else:
                self._files.move_to_end(path)
            return os.pread(f.fileno(), length, offset)


_OPEN_FILES = _OpenFiles()


class Reader:
    """Reads the records of pieces of one dataset's files, and parses them into rows."""

    def __init__(self, layouts: dict[str, Layout], columns: Columns, score_scale: float, unit_interval: bool,
                 dataset: str):
        self.layouts, self.columns, self.score_scale = layouts, columns, score_scale
        self.unit_interval, self.dataset = unit_interval, dataset

    def read(self, piece: Piece, offset: int) -> Iterator[tuple[list, list, int]]:
        """The records from `offset` (a position inside the piece) to the piece's end, a block at a
        time: (raws, wheres, the offset after the block). A record is a row as read, parsed only when
        a batch takes it: a TSV/JSON line's bytes, or the values of a CSV/parquet row; its `where` is
        its byte offset (lines) or row number in its file, a position reading can start at."""
        fmt = self.layouts[piece.path].fmt
        if fmt.kind == "parquet":
            yield from self._parquet_rows(piece, offset)
        elif fmt.splittable:
            yield from self._lines(piece, offset)
        else:
            yield from self._whole_file(fmt, offset)

    def keeps_lines(self, path: str) -> bool:
        """Whether `path`'s records are lines that line() can read again by position (.tsv, .jsonl),
        so that a stream's window need not keep their bytes."""
        fmt = self.layouts[path].fmt
        return fmt.splittable and fmt.kind != "parquet" and not is_url(path)  # a URL: a request a line

    def line(self, path: str, where: int, length: int) -> bytes:
        """The record `read` gave at `where`, `length` bytes, read again from the file."""
        data = _OPEN_FILES.pread(path, length, where)
        if len(data) != length:
            raise UserError(f"{path} ended at byte {where + len(data)}, before a line the run had read there: the "
                            "file changed; restore it, or start again in a new --output-dir")
        return data

    def _lines(self, piece: Piece, offset: int):
        path = piece.path
        at = max(offset, piece.start)
        with open_file(path) as f:
            f.seek(at)
            carry = b""
            while at + len(carry) < piece.end:
                chunk = f.read(min(READ_BYTES, piece.end - at - len(carry)))
                if not chunk:
                    raise UserError(f"{path} ended at byte {at + len(carry)}, before its size when the run began "
                                    f"({piece.end} or more): the file changed; restore it, or start again in a new "
                                    "--output-dir")
                data = carry + chunk
                last = data.rfind(b"\n")
                if at + len(data) >= piece.end:
                    last = len(data) - 1  # the piece ends at a line end (or the file's end)
                if last < 0:
                    carry = data
                    continue
                block, carry = data[:last + 1], data[last + 1:]
                raws, wheres = [], []
                pos = at
                for line in block.split(b"\n"):
                    if line not in BLANK and (pos or self.layouts[path].fmt.kind != "tsv"):  # not the header
                        raws.append(line)
                        wheres.append(pos)
                    pos += len(line) + 1
                at += len(block)
                yield raws, wheres, at

    def _whole_file(self, fmt: FileFormat, offset: int):
        """CSV and gzipped files, from row `offset` (rows are counted, not seeked to)."""
        raws, wheres, row = [], [], 0
        try:
            with _open_binary(fmt) as f:
                for values in _csv_rows(f) if fmt.kind == "csv" else _line_rows(f, header=fmt.kind == "tsv"):
                    if row >= offset:
                        raws.append(values)
                        wheres.append(row)
                    row += 1
                    if len(raws) >= 65536:
                        yield raws, wheres, row
                        raws, wheres = [], []
        except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
            raise UserError(f"{fmt.path} cannot be read after row {row} ({e}); check that the file is complete") from None
        except Exception as e:  # noqa: BLE001 - the csv module's errors
            if type(e).__module__ == "_csv":
                raise UserError(f"{fmt.path} row {row + 1} is not valid CSV ({e}); fix the row") from None
            raise
        if raws:
            yield raws, wheres, row

    def _parquet_rows(self, piece: Piece, offset: int):
        layout = self.layouts[piece.path]
        pf = _parquet(piece.path)
        meta = pf.metadata
        first = 0
        start = max(offset, piece.start)
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            lo, hi = max(start, first), min(piece.end, first + n)
            if lo < hi:
                table = pf.read_row_group(g, columns=list(layout.wanted)).slice(lo - first, hi - lo)
                values = [table.column(c).to_pylist() for c in layout.wanted]
                yield list(zip(*values)), list(range(lo, hi)), hi
            first += n
            if first >= piece.end:
                break

    # ------------------------------------------------------------------ parsing

    def parse(self, path: str, raw, where: int) -> tuple:
        """(texts..., score) of a record; a bad one raises a UserError naming its line."""
        layout = self.layouts[path]
        kind = layout.fmt.kind
        if kind == "tsv" or kind == "csv":
            if isinstance(raw, bytes):
                try:
                    fields = raw.rstrip(b"\r").decode("utf-8").split("\t")
                except UnicodeDecodeError as e:
                    raise UserError(f"{self.where(path, where)} is not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                    "line); save the file as UTF-8") from None
            else:
                fields = raw
            if len(fields) != layout.n_fields:
                raise UserError(f"{self.where(path, where)} has {len(fields)} fields, the header {layout.n_fields}; "
                                "fix the row (TSV is read without quoting: a tab inside a text splits it)")
            values = [fields[p] for p in layout.positions]
        elif kind == "jsonl":
            row = _json_row(raw, path, self._line_number(path, where))
            missing = [c for c in layout.wanted if c not in row]
            if missing:
                raise UserError(f"{self.where(path, where)} has no {', '.join(map(repr, missing))}; every line needs "
                                f"the dataset's columns ({', '.join(layout.wanted)})")
            values = [row[c] for c in layout.wanted]
        else:
            values = list(raw)
        n_texts = len(self.columns.texts())
        for name, text in zip(layout.wanted[:n_texts], values[:n_texts]):
            if not isinstance(text, str):
                raise UserError(f"{self.where(path, where)}: {name} is {type(text).__name__} {text!r:.40}, not text; "
                                "fix the row")
        if not layout.has_score:
            return (*values[:n_texts], 1.0)
        value = values[n_texts]
        try:  # the usual case first; the row's line is looked up only for an error
            number = float(value) if not isinstance(value, (bool, str)) or value.strip() else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or isinstance(value, bool):
            number = _parse_score(value, self.where(path, where))
        score = number / self.score_scale
        if self.unit_interval and not 0.0 <= score <= 1.0:
            raise UserError(f"{self.where(path, where)}: score {values[n_texts]} is outside [0, 1] (CosineSimilarityLoss "
                            "needs labels in [0, 1]); for 0-5 STS scores pass --score-scale 5 (or \"score_scale\": 5 in the data config)")
        return (*values[:n_texts], score)

    def where(self, path: str, where: int) -> str:
        if self.layouts[path].fmt.kind == "parquet":
            return f"{path} row {where}"
        return f"{path} line {self._line_number(path, where)}"

    def _line_number(self, path: str, where: int) -> int:
        fmt = self.layouts[path].fmt
        if not fmt.splittable:
            return where + (2 if fmt.kind in ("tsv", "csv") else 1)  # a row count (blank lines not counted)
        return _line_of_offset(path, where)


def _csv_rows(f) -> Iterator[list[str]]:
    """A CSV file's rows after its header, blank lines left out."""
    import csv

    rows = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""))
    next(rows, None)
    return (values for values in rows if values and values != [""])


def _line_rows(f, header: bool) -> Iterator[bytes]:
    """A line file's lines (their bytes), after its header if it has one, blank lines left out."""
    lines = iter(f)
    if header:
        next(lines, None)
    return (line for line in (raw.rstrip(b"\n") for raw in lines) if line not in BLANK)


def _line_of_offset(path: str, offset: int) -> int:
    """The 1-based line number of the line starting at byte `offset` (an error path only: it reads the
    file up to there)."""
    lines = 1
    with open_file(path) as f:
        left = offset
        while left > 0:
            chunk = f.read(min(READ_BYTES, left))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            left -= len(chunk)
    return lines


# ----------------------------------------------------------------------------- counting

def count_records(piece: Piece, layout: Layout) -> int:
    """The records a piece holds, as the reader yields them, without parsing them: newlines less blank
    lines for line files (a few GB/s), parquet's metadata, a read of a whole CSV or gzipped file."""
    fmt = layout.fmt
    if fmt.kind == "parquet":
        return piece.end - piece.start
    if not fmt.splittable:
        reader = Reader({piece.path: layout}, Columns(*layout.wanted[:2]), 1.0, False, "")
        return sum(len(raws) for raws, _, _ in reader._whole_file(fmt, 0))
    total, prefix = 0, b"\n"  # a piece starts at a line start: as if after a newline
    with open_file(piece.path) as f:
        f.seek(piece.start)
        left = piece.end - piece.start
        while left > 0:
            chunk = f.read(min(READ_BYTES, left))
            if not chunk:
                break
            left -= len(chunk)
            total += chunk.count(b"\n")
            joined = prefix + chunk
            if b"\n\n" not in joined and b"\n\r\n" not in joined:  # no blank line: the usual case, at GB/s
                prefix = joined[-2:]
                continue
            total -= chunk.count(b"\n")  # counted again below, with the blank lines
            data = np.frombuffer(joined, np.uint8)
            newline = data == 10
            # terminated lines, less the blank ones ("" or "\r" between two newlines); overlapping
            # patterns counted by position, which bytes.count would not
            first, third = len(prefix), max(len(prefix), 2)  # patterns ending in this chunk only
            total += int(newline[first:].sum())
            total -= int((newline[first:] & newline[first - 1:-1]).sum())
            total -= int((newline[third:] & (data[third - 1:-1] == 13) & newline[third - 2:-2]).sum())
            prefix = (prefix + chunk)[-2:]
        if piece.end > piece.start and prefix[-1:] != b"\n":
            total += _last_line(f, piece) not in BLANK  # a last line without a newline
    if piece.start == 0 and layout.fmt.kind == "tsv":
        total -= 1  # the header
    return total


def _last_line(f, piece: Piece) -> bytes:
    back = min(piece.end - piece.start, 1 << 20)
    f.seek(piece.end - back)
    data = f.read(back)
    return data[data.rfind(b"\n") + 1:]


class MemoryReader:
    """Rows already in memory (a hub dataset, read whole by `datasets`), served as one row-range
    "file" so that streams treat them as they treat parquet."""

    PATH = "<memory>"

    def __init__(self, rows: list[tuple], name: str):
        self.rows, self.dataset, self.score_scale = rows, name, 1.0
        self.layouts = {self.PATH: Layout(FileFormat(self.PATH, "parquet", False), ())}

    def read(self, piece: Piece, offset: int):
        lo = max(offset, piece.start)
        if lo < piece.end:
            yield self.rows[lo:piece.end], list(range(lo, piece.end)), piece.end

    def keeps_lines(self, path: str) -> bool:
        return False

    def parse(self, path: str, raw, where: int) -> tuple:
        return raw

    def where(self, path: str, where: int) -> str:
        return f"{self.dataset} row {where}"

    def pieces(self, n_shards: int) -> tuple[list[Piece], ...]:
        n = len(self.rows)
        return tuple([Piece(self.PATH, n * d // n_shards, n * (d + 1) // n_shards)] for d in range(n_shards))
