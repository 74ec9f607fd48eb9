"""The training input: named datasets -> per-shard streams -> tokenised, packed Dispatches, built on
a background thread while the devices run, and resumable from a small JSON state.

What the loop sees (train_lib.py): `InputPipeline.open(...)` before training, then
`pipeline.dispatches(start_step, end_step)`, whose items are (Dispatch, group, state): the device
call's arrays (data.Dispatch, [local devices, steps, ...]), which of the run's step programs (one per
distinct loss and column count) runs it, and the streams' state after it, which the checkpoint of
its last step saves.

Sharding: every dataset is read as S shards (--data-shards; default: the global device count):
its files are cut into pieces (sources.py), a multiple of S per splittable file, and shard s reads
pieces s, s + S, ... Device d owns shards d*S/n ... (d+1)*S/n - 1 and each host opens only its own
devices' shards. A step's batch is one dataset's (schedule.py): each shard gives batch / S rows,
from its own stream, which fill the block of the global batch that belongs to it. The order is a
function of the seed, the options and S alone, not of how many devices or hosts share the
shards: 8 devices train as 1 device with --data-shards 8, and 2 processes of 2 devices as 1 of 4.

Every host must run the same program for a step: whether a step fits the fast packed shape is
agreed over all hosts (each says whether its devices' sentences fit, through the distributed
runtime's key-value store), on the batch thread, ahead of the devices.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from minilm_jax import data as data_lib
from minilm_jax.errors import UserError
from minilm_jax.input.schedule import Schedule
from minilm_jax.input.sources import Piece, Reader, count_records, expand_files, layout_of, pieces_of
from minilm_jax.input.spec import DatasetSpec
from minilm_jax.input.stream import ShardStream, positives

# Rows tokenised in one call of the tokenizer (its batch encoder runs on every core): several
# dispatches' worth, so that the call's overhead is shared.
TOKENIZE_ROWS = 2048
CHECK_ROWS = 65536  # rows of each stream parsed before a new run starts (about 0.1 s)
SAMPLE_ROWS = 1000  # a dataset's first rows, which the model card describes (sentence-transformers' card too)


@dataclasses.dataclass(frozen=True)
class DatasetInput:
    """One dataset as the pipeline reads it."""

    spec: DatasetSpec
    index: int
    group: int  # which step program its batches run in
    n_columns: int
    prompts: tuple[str, ...]  # per text column ("" for none)
    layouts: dict  # path -> Layout
    pieces: tuple  # of every shard: tuple of lists of Piece, by shard
    unit_interval: bool = False  # labels must lie in [0, 1] (CosineSimilarityLoss)
    memory: object = None  # sources.MemoryReader of a hub dataset's rows, read whole


def shard_pieces(files: Sequence[str], n_shards: int) -> tuple[list[Piece], ...]:
    """Every shard's pieces of these files: piece j of a splittable file to shard j % S, the k-th
    whole file (.csv, .gz) to shard k % S."""
    out: tuple[list[Piece], ...] = tuple([] for _ in range(n_shards))
    whole = 0
    for path in files:
        pieces = pieces_of(path, n_shards)
        if len(pieces) == 1 and pieces[0].end == -1:
            out[whole % n_shards].append(pieces[0])
            whole += 1
        else:
            for j, piece in enumerate(pieces):
                out[j % n_shards].append(piece)
    return out


class InputPipeline:
    def __init__(self, datasets: list[DatasetInput], schedule: Schedule, tokenizer, *, layout: data_lib.BatchLayout,
                 shapes: Sequence[data_lib.StepShapes], steps_per_dispatch: int, seed: int, window_rows: int,
                 no_duplicates: Sequence[bool], agree=None, chain=None):
        """shapes: the step shapes of each group; no_duplicates: per dataset; agree(first_step, flags)
        -> the flags ORed over every host (None: one host); chain: hosts.TextChain (None: one host).
        The shard count is the datasets'."""
        self.datasets, self.schedule, self.tokenizer = datasets, schedule, tokenizer
        self.layout, self.shapes, self.steps_per_dispatch = layout, list(shapes), steps_per_dispatch
        self.agree = agree
        self.chain = chain  # hosts.TextChain on several hosts: the lower hosts' texts of a step
        self.n_shards = len(datasets[0].pieces)
        self.per_device = self.n_shards // layout.global_devices  # shards a device owns
        self.block = layout.batch_size // self.n_shards  # rows a shard gives to a step
        first = layout.first_device * self.per_device
        self.shards = range(first, first + layout.local_devices * self.per_device)  # this host's
        self.streams = [[self._stream(ds, s, seed, window_rows, no_duplicates[ds.index]) for s in self.shards]
                        for ds in datasets]
        self.data_wait_seconds = 0.0

    def _stream(self, ds: DatasetInput, shard: int, seed: int, window_rows: int, no_duplicates: bool):
        reader = ds.memory or Reader(ds.layouts, ds.spec.columns, ds.spec.score_scale, ds.unit_interval, ds.spec.name)
        return ShardStream(reader, ds.pieces[shard], seed=seed, dataset=ds.index, device=shard,
                           window_rows=window_rows, no_duplicates=no_duplicates, positives_only=ds.spec.positives_only,
                           add_swapped=ds.spec.add_swapped, name=ds.spec.name, n_columns=ds.n_columns)

    def check_head(self, rows: int = CHECK_ROWS) -> None:
        """Parse the first rows of every local stream (all of a dataset whose share fits), so that a bad
        row there stops a new run before its output folder is made; a bad row further on stops the
        run when a batch reaches it, naming its file and line, with the checkpoints it wrote intact."""
        for streams in self.streams:
            for stream in streams:
                stream.check(rows)

    def rows_read(self) -> int:
        """Rows this host has read into its streams' windows (a window re-read after a resume again)."""
        return sum(stream.rows_read for streams in self.streams for stream in streams)

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {f"{ds.spec.name}/{shard}": stream.state()
                for ds, streams in zip(self.datasets, self.streams) for shard, stream in zip(self.shards, streams)}

    def restore(self, state: dict) -> None:
        for ds, streams in zip(self.datasets, self.streams):
            for shard, stream in zip(self.shards, streams):
                key = f"{ds.spec.name}/{shard}"
                if key not in state:
                    raise UserError(f"the checkpoint holds no input position for dataset {ds.spec.name}, shard {shard}: "
                                    "it was written by a run with other datasets; resume with the same ones, or start "
                                    "again in a new --output-dir")
                stream.restore(state[key])

    # ------------------------------------------------------------------ dispatches

    def groups_of(self, start: int, end: int) -> Iterator[tuple[int, range, list[int]]]:
        """(group, steps, each step's dataset) of each device call: consecutive steps of one group,
        never across a multiple of steps_per_dispatch (so that a run resumed at a checkpoint makes the
        same calls). Each step's dataset is drawn once."""
        k = self.steps_per_dispatch
        s = start
        following = self.schedule.dataset_of(s) if s < end else None
        while s < end:
            datasets = [following]
            group = self.datasets[following].group
            e = s + 1
            while e < end:
                following = self.schedule.dataset_of(e)
                if not e % k or self.datasets[following].group != group:
                    break
                datasets.append(following)
                e += 1
            yield group, range(s, e), datasets
            s = e

    def dispatches(self, start: int, end: int) -> Iterator[tuple[data_lib.Dispatch, int, dict]]:
        """(Dispatch, group, the streams' state after it) for steps [start, end), in order."""
        chunk = []
        rows = 0
        for group, steps, datasets in self.groups_of(start, end):
            taken = [self._take(s, i) for s, i in zip(steps, datasets)]
            chunk.append((group, steps, taken, self.state()))
            rows += sum(len(r) for _, shares in taken for r in shares)
            if rows >= TOKENIZE_ROWS:
                yield from self._build(chunk)
                chunk, rows = [], 0
        yield from self._build(chunk)

    def _take(self, step: int, i: int) -> tuple[int, list[list[tuple]]]:
        """(dataset i, each local device's share: [(its slot, row)]) of one step: each shard's rows in
        the block of the device's share that belongs to the shard (a short block leaves padding)."""
        epoch = self.schedule.epoch_of(step)
        streams = self.streams[i]
        if self.n_shards == 1 or not streams[0].no_duplicates:
            blocks = [stream.take(self.block, epoch) for stream in streams]
        else:
            # No text twice in the global batch: shard s leaves out what shards 0..s-1 took in this step,
            # the lower hosts' shards included (passed along, host after host: hosts.TextChain). The
            # order so depends on the shard count alone, not on how the shards are spread over hosts.
            taken = self.chain.lower(i, step) if self.chain else set()
            blocks = [stream.take(self.block, epoch, taken) for stream in streams]  # each adds its texts
            if self.chain:
                self.chain.pass_on(i, step, taken)
        shares = []
        for d in range(self.layout.local_devices):
            mine = blocks[d * self.per_device:(d + 1) * self.per_device]
            shares.append([(j * self.block + k, row) for j, rows in enumerate(mine) for k, row in enumerate(rows)])
        return i, shares

    def _build(self, chunk: list) -> Iterator[tuple[data_lib.Dispatch, int, dict]]:
        if not chunk:
            return
        texts = []
        for _, _, taken, _ in chunk:
            for i, shares in taken:
                ds = self.datasets[i]
                for share in shares:
                    for c in range(ds.n_columns):
                        prompt = ds.prompts[c]
                        texts += [prompt + row[c] for _, row in share] if prompt else [row[c] for _, row in share]
        ids = iter(self.tokenizer.token_ids(texts)) if texts else iter(())
        for group, steps, taken, state in chunk:
            shapes = self.shapes[group]
            per_step = []  # (labels and weights per device, sentences per device, fast packings or None)
            for i, shares in taken:
                ds = self.datasets[i]
                sentences, pairs = [], []
                for share in shares:
                    column_ids = [[next(ids) for _ in share] for _ in range(ds.n_columns)]
                    sentences.append([(c * shapes.pairs + slot, column_ids[c][k])
                                      for c in range(ds.n_columns) for k, (slot, _) in enumerate(share)])
                    labels, weights = np.zeros(shapes.pairs, np.float32), np.zeros(shapes.pairs, np.float32)
                    slots = [slot for slot, _ in share]
                    labels[slots] = [row[-1] for _, row in share]
                    weights[slots] = 1.0
                    pairs.append({"labels": labels, "weights": weights})
                packings = [data_lib._fast_packing(x, shapes) for x in sentences]
                per_step.append((pairs, sentences, packings))
            local_general = [any(p is None for p in packings) for _, _, packings in per_step]
            general = self.agree(steps.start, local_general) if self.agree else local_general
            kinds = [data_lib.GENERAL if g else data_lib.FAST for g in general]
            dispatch = data_lib.assemble_dispatch(
                steps.start, kinds, [[(pairs[d], sentences[d], packings[d]) for pairs, sentences, packings in per_step]
                                     for d in range(self.layout.local_devices)], shapes, self.steps_per_dispatch)
            yield dispatch, group, state


# ----------------------------------------------------------------------------- opening the datasets

def open_dataset(spec: DatasetSpec, index: int, group: int, n_shards: int, *, score_required: bool,
                 unit_interval: bool, prompts: tuple[str, ...]) -> DatasetInput:
    """Check the dataset's files (their headers or schemas only) and cut them into every shard's
    pieces."""
    files = expand_files(spec.files, spec.name)
    layouts = {path: layout_of(path, spec.columns, score_required or spec.positives_only) for path in files}
    return DatasetInput(spec, index, group, len(spec.columns.texts()), prompts, layouts,
                        shard_pieces(files, n_shards), unit_interval)


def first_rows(ds: DatasetInput, n: int = SAMPLE_ROWS) -> list[tuple]:
    """The dataset's first n rows in file order (shuffling and shards aside): what the model card
    describes, the same whatever step a run resumed at."""
    if ds.memory is not None:
        return ds.memory.rows[:n]
    reader = Reader(ds.layouts, ds.spec.columns, ds.spec.score_scale, ds.unit_interval, ds.spec.name)
    order = {path: i for i, path in enumerate(ds.layouts)}
    rows: list[tuple] = []
    for piece in sorted((p for pieces in ds.pieces for p in pieces), key=lambda p: (order[p.path], p.start)):
        for raws, wheres, _ in reader.read(piece, piece.start):
            rows += [reader.parse(piece.path, r, w) for r, w in zip(raws[:n - len(rows)], wheres)]
            if len(rows) >= n:
                return rows
    return rows


def count_rows(ds: DatasetInput, shards: Sequence[int]) -> list[int]:
    """The rows of each of these shards (records less, with positives_only, the rows not labelled 1;
    doubled with add_swapped)."""
    counts = []
    for d in shards:
        if ds.memory is not None:
            n = sum(p.end - p.start for p in ds.pieces[d])
        elif ds.spec.positives_only:  # which rows are labelled 1 is known only by parsing them
            reader = Reader(ds.layouts, ds.spec.columns, ds.spec.score_scale, False, ds.spec.name)
            n = sum(len(positives(reader, piece, raws, wheres))
                    for piece in ds.pieces[d] for raws, wheres, _ in reader.read(piece, piece.start))
        else:
            n = sum(count_records(p, ds.layouts[p.path]) for p in ds.pieces[d])
        counts.append(n * (2 if ds.spec.add_swapped else 1))
    return counts


def batches_per_epoch(shard_rows: Sequence[int], block: int) -> int:
    """A dataset's steps in an epoch: as many as its fullest shard needs at `block` rows a step (one
    shard: ceil(rows / batch), sentence-transformers' count with its short last batch kept)."""
    return max(math.ceil(r / block) for r in shard_rows)


# ----------------------------------------------------------------------------- the batch thread

class Prefetch:
    """Run `items` on a background thread, `depth` items ahead, so that the devices do not wait for
    tokenised, packed batches; `wait_seconds` is how long the consumer waited nonetheless.
    Exceptions are raised in the consumer."""

    def __init__(self, items: Iterator, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = object()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, args=(items,), daemon=True, name="minilm-jax-input")
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(e)
            return
        self._queue.put(self._done)

    def __iter__(self):
        return self

    def __next__(self):
        began = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - began
        if item is self._done:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # let a producer blocked on a full queue see the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
