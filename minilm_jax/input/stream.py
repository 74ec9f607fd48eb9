"""One shard's stream of one dataset (a device reads one shard, or several with --data-shards): its pieces read in order, a window of rows at a time,
each window shuffled; endless, epoch after epoch, and resumable from a small state.

- Each epoch visits the device's pieces in an order drawn from (seed, epoch, dataset, device), and
  reads them a window (`window_rows` records) at a time; a window is shuffled as one permutation.
  The first window of dataset 0 on device 0 is drawn from `default_rng([seed, epoch])`, the
  permutation data.epoch_permutation gave the whole data before streaming: data that fits one
  window on one device is batched as it always was.
- `take(k)` gives the rows of one device's share of a step: k of them, fewer only where the epoch
  ends (sentence-transformers' short last batch). The next take starts the next epoch.
- No duplicates (sentence-transformers' NO_DUPLICATES, sampler.py): a take walks the rows not yet
  taken in order and takes each row none of whose texts the batch already holds; a conflicting row
  is deferred and met first by the next walk. Rows still deferred when a window ends are carried
  into the next one (ahead of its rows), so the walk runs across windows; it yields a short batch
  only at the end of an epoch. Over one window this is sampler.no_duplicates_batches exactly. With
  several shards a step's blocks are walked in shard order, each leaving out the texts the blocks
  before it took (`taken`; pipeline.py), so that the global batch holds no text twice.
- `state()` after a take is all a resumed stream needs: the epoch, the window's index and where it
  starts (a piece and an offset in it), how far the walk has gone, and the deferred and carried
  rows. `restore(state)` re-reads that one window.
- Memory: one window of records (WindowRecords): 24 bytes a .tsv/.jsonl line with its place in the
  permutation, the values themselves of a CSV, .gz or parquet row; never more than a window.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array

import numpy as np

from minilm_jax.errors import UserError
from minilm_jax.input.sources import Piece, Reader


class WindowRecords:
    """A window's records in the order read. A line of a .tsv or .jsonl file is kept as where it is
    (its file, byte offset and length: 16 bytes) and read again, with one pread, when a batch takes
    it; any other record (the values of a CSV, .gz or parquet row) as read. Keeping the lines' bytes
    as Python objects took about 210 bytes a Quora row: 80 MB for a 363,858-pair file, 110 MB for a
    full window of 524,288 rows, the data-size-dependent part of a run's memory."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.paths: list[str] = []
        self._index: dict[str, int] = {}
        self._file, self._where, self._length = array("i"), array("q"), array("i")  # length -1: a value record
        self._values: list | None = None  # per record: its values, or None for a line (made at the first value)

    def __len__(self) -> int:
        return len(self._where)

    def add(self, path: str, raws: list, wheres: list) -> None:
        n = len(raws)
        if path not in self._index:
            self._index[path] = len(self.paths)
            self.paths.append(path)
        self._file.extend(itertools.repeat(self._index[path], n))
        self._where.extend(wheres)
        if self.reader.keeps_lines(path):
            self._length.extend(map(len, raws))
            if self._values is not None:
                self._values.extend(itertools.repeat(None, n))
        else:
            self._length.extend(itertools.repeat(-1, n))
            if self._values is None:
                self._values = [None] * (len(self._where) - n)
            self._values.extend(raws)

    def path(self, i: int) -> str:
        return self.paths[self._file[i]]

    def where(self, i: int) -> int:
        return self._where[i]

    def raw(self, i: int):
        length = self._length[i]
        if length < 0:
            return self._values[i]
        return self.reader.line(self.path(i), self._where[i], length)


class ShardStream:
    def __init__(self, reader: Reader, pieces: list[Piece], *, seed: int, dataset: int, device: int,
                 window_rows: int, no_duplicates: bool, positives_only: bool = False, add_swapped: bool = False,
                 name: str = "", n_columns: int = 2):
        self.reader, self.pieces = reader, list(pieces)
        self.seed, self.dataset, self.device = seed, dataset, device
        self.window_rows, self.no_duplicates = window_rows, no_duplicates
        self.positives_only, self.add_swapped = positives_only, add_swapped
        self.name, self.n_columns = name, n_columns
        self.rows_read = 0  # records read into windows (a window re-read after a restore included)
        self.records: WindowRecords | None = None
        self._check_rows = 0  # check(): how many of the first window's records to parse as they are read
        self.epoch = -1  # nothing read yet: the first take (or a restore) reads the first window

    # ------------------------------------------------------------------ windows

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _piece_order(self, epoch: int) -> list[int]:
        if len(self.pieces) < 2:
            return list(range(len(self.pieces)))
        return self._rng(epoch, self.dataset, self.device, 1 << 20).permutation(len(self.pieces)).tolist()

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.order = epoch, self._piece_order(epoch)
        self.carried: list[tuple] = []
        self._load_window(0, (0, 0))
        if not self.size and not self.last_window:
            raise AssertionError("a window came back empty before its epoch's end")
        if not self.size:
            where = ", ".join(sorted({p.path for p in self.pieces})) or "no piece"
            raise UserError(f"dataset {self.name}: shard {self.device} of the data holds no row ({where}); "
                            "the data has fewer rows (or .csv/.gz files) than the run has shards (--data-shards, "
                            "default one per device): give more rows or files, use .tsv/.jsonl/.parquet (which are "
                            "split by bytes or rows), or fewer shards")

    def _load_window(self, window: int, start: tuple[int, int]) -> None:
        """Read the window starting at `start` (position in the epoch's piece order, offset in that
        piece) and draw its permutation."""
        self.window, self.start = window, start
        self.records = None  # the window before: let go of before this one is read
        records = WindowRecords(self.reader)
        pos, offset = start
        while pos < len(self.order) and len(records) < self.window_rows:
            piece = self.pieces[self.order[pos]]
            need = self.window_rows - len(records)
            offset = max(offset, piece.start)
            for block_raws, block_wheres, after in self.reader.read(piece, offset):
                if self.positives_only:
                    keep = positives(self.reader, piece, block_raws, block_wheres)
                    block_raws = [block_raws[i] for i in keep]
                    block_wheres = [block_wheres[i] for i in keep]
                if self._check_rows > len(records):  # check(): parsed while the bytes are at hand
                    for raw, where in zip(block_raws[:self._check_rows - len(records)], block_wheres):
                        self.reader.parse(piece.path, raw, where)
                if len(block_raws) >= need:
                    records.add(piece.path, block_raws[:need], block_wheres[:need])
                    offset = block_wheres[need] if len(block_raws) > need else after
                    break
                records.add(piece.path, block_raws, block_wheres)
                need -= len(block_raws)
                offset = after
            else:
                pos, offset = pos + 1, 0
                continue
            if self._at_piece_end(piece, offset):
                pos, offset = pos + 1, 0
            break
        self.rows_read += len(records)
        self.next_start = (pos, offset)
        self.last_window = pos >= len(self.order)
        self.records = records
        n = len(records) * (2 if self.add_swapped else 1)
        self.size = n
        key = (self.epoch,) if (self.dataset, self.device, window) == (0, 0, 0) else (
            self.epoch, self.dataset, self.device, window)
        self.perm = self._rng(*key).permutation(n)
        self.frontier = 0
        self.deferred: dict[int, tuple] = {}  # window position -> its row, taken later

    def _at_piece_end(self, piece: Piece, offset: int) -> bool:
        fmt = self.reader.layouts[piece.path].fmt
        if fmt.kind == "parquet" or fmt.splittable:
            return offset >= piece.end
        return False  # a whole file ends when its reader says so

    def _row(self, position: int) -> tuple:
        """The parsed row at a position of the window's permuted order."""
        i = int(self.perm[position])
        records = self.records
        swapped = i >= len(records)
        if swapped:
            i -= len(records)
        row = self.reader.parse(records.path(i), records.raw(i), records.where(i))
        if swapped:
            row = (row[1], row[0], *row[2:])
        return row

    # ------------------------------------------------------------------ taking rows

    def _exhausted(self) -> bool:
        if self.epoch < 0:
            return True
        return self.frontier >= self.size and not self.deferred and not self.carried and self.last_window

    def take(self, k: int, epoch: int | None = None, taken: set[str] | None = None) -> list[tuple]:
        """The rows of one share of a step: k, fewer only at the end of an epoch; the next take
        starts the next epoch. `epoch`: the run's epoch, where the run has epochs of a planned length:
        the stream starts it if it is behind (leaving what it had not taken), and gives no rows
        once it has taken all of it. `taken` (no duplicates, several shards): the text_key of every
        text the step's blocks before this one hold, which this block leaves to a later step; the
        keys of the texts it takes are added to it, for the blocks after it."""
        if epoch is not None and epoch > self.epoch:
            self._start_epoch(epoch)
        elif self._exhausted():
            if epoch is not None and self.epoch >= 0:
                return []
            self._start_epoch(self.epoch + 1)
        if not self.no_duplicates:
            return self._take_in_order(k)
        return self._walk(k, taken)

    def _take_in_order(self, k: int) -> list[tuple]:
        rows = []
        while len(rows) < k:
            if self.frontier >= self.size:
                if self.last_window:
                    break
                self._load_window(self.window + 1, self.next_start)
                continue
            end = min(self.size, self.frontier + k - len(rows))
            rows += [self._row(p) for p in range(self.frontier, end)]
            self.frontier = end
        return rows

    def _walk(self, k: int, taken: set[str] | None) -> list[tuple]:
        batch, seen = [], set()

        def fits(row) -> bool:
            texts = row[:self.n_columns]
            if not seen.isdisjoint(texts):
                return False
            if taken is not None:
                keys = [text_key(t) for t in texts]
                if not taken.isdisjoint(keys):
                    return False
                taken.update(keys)
            batch.append(row)
            seen.update(texts)
            return True

        # carried rows, then deferred ones, then the window from the frontier on: the walk's order
        kept = []
        for row in self.carried:
            if len(batch) >= k or not fits(row):
                kept.append(row)
        self.carried = kept
        for position in sorted(self.deferred):
            if len(batch) >= k:
                break
            if fits(self.deferred[position]):
                del self.deferred[position]
        while len(batch) < k:
            if self.frontier >= self.size:
                if self.last_window:
                    break
                self.carried += [self.deferred[p] for p in sorted(self.deferred)]
                self._load_window(self.window + 1, self.next_start)
                continue
            row = self._row(self.frontier)
            if not fits(row):
                self.deferred[self.frontier] = row
            self.frontier += 1
        return batch

    def check(self, rows: int) -> None:
        """Read the first window and parse its first `rows` records, so that a bad row there is
        reported before a run starts (the window stays loaded for the first take)."""
        if self.epoch < 0:
            self._check_rows = rows
            try:
                self._start_epoch(0)
            finally:
                self._check_rows = 0
            return
        records = self.records
        for i in range(min(rows, len(records))):
            self.reader.parse(records.path(i), records.raw(i), records.where(i))

    # ------------------------------------------------------------------ resuming

    def state(self) -> dict:
        if self.epoch < 0:
            return {"epoch": -1}  # nothing taken yet
        return {"epoch": self.epoch, "window": self.window, "start": list(self.start), "frontier": self.frontier,
                "deferred": sorted(self.deferred), "carried": [list(r) for r in self.carried]}

    def restore(self, state: dict) -> None:
        if state["epoch"] < 0:
            self.epoch = -1
            return
        self.epoch, self.order = state["epoch"], self._piece_order(state["epoch"])
        self._load_window(state["window"], tuple(state["start"]))
        self.frontier = state["frontier"]
        self.deferred = {p: self._row(p) for p in state["deferred"]}
        self.carried = [tuple(r) for r in state["carried"]]


def positives(reader: Reader, piece: Piece, raws: list, wheres: list) -> list[int]:
    """Which of these records are labelled 1 (positives_only: the duplicates of a pair-class file)."""
    keep = []
    for i, (r, w) in enumerate(zip(raws, wheres)):
        label = reader.parse(piece.path, r, w)[-1] * reader.score_scale
        if label not in (0.0, 1.0):
            raise UserError(f"{reader.where(piece.path, w)}: label {label:g} is not 0 or 1; positives_only "
                            "keeps the rows labelled 1 (duplicates) of a pair-class file")
        if label == 1.0:
            keep.append(i)
    return keep


def text_key(text: str) -> str:
    """A text's identity between shards (and hosts): 64 bits of its BLAKE2b hash."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
