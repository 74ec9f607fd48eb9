"""Embed a corpus of texts to disk (corpus.py's layout), on every local device, shared over processes,
resumable.

The corpus is cut into shards of `shard_rows` rows; shard i belongs to process i % process_count.
Each process reads the text stream once and embeds its shards that have no record yet, in blocks
of `block_rows` texts (`encode_blocks`: each block sorted by length and spread over the devices as
`encode` does, the next block tokenised while this one runs), quantizes each block, and writes
each shard atomically. Memory is bounded by one shard
and one block, not by the corpus. When all shards are there, process 0 writes the complete manifest.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import time

import numpy as np

from minilm_jax import corpus as store
from minilm_jax.errors import UserError, UsageError
from minilm_jax.quantize import CALIBRATED, check_precision, check_ranges, quantize, ranges_of

DEFAULT_SHARD_ROWS = 16384
DEFAULT_BLOCK_ROWS = 4096
DEFAULT_CALIBRATION_ROWS = 10000


_BARRIER_HOURS = 72  # the processes' shards can take hours, and one may finish long before another


def _barrier(name: str, process_count: int) -> None:
    """Every process waits here for the others, on the coordination service's barrier (no collective on the
    devices, whose timeouts are seconds)."""
    if process_count > 1:
        from jax._src import distributed as jax_distributed  # the client: jax has no public barrier without devices

        jax_distributed.global_state.client.wait_at_barrier(name, _BARRIER_HOURS * 3600 * 1000)


def _encode_rows(source: store.TextSource, start: int, stop: int, block_rows: int, embed_blocks):
    """Float32 embeddings of rows [start, stop), a block at a time (the blocks the shards use)."""
    texts = itertools.islice(source.texts(), start, None)
    return np.concatenate(list(embed_blocks(store.blocks(texts, start, stop, block_rows))))


def _calibration_ranges(source, plan_rows: int, calibration, calibration_rows: int, block_rows: int, dim: int,
                        embed_blocks) -> np.ndarray:
    if calibration is not None:
        try:
            array = np.load(calibration, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"--calibration {calibration} is not a readable .npy file ({e})") from None
        if array.ndim == 2 and array.shape == (2, dim):
            return check_ranges(array, dim)
        if array.ndim != 2 or array.shape[1] != dim:
            raise UserError(f"--calibration {calibration} holds {array.dtype} {array.shape}; give [2, {dim}] ranges "
                            f"(minima, maxima) or [N, {dim}] float32 calibration embeddings")
        return ranges_of(array)
    n = min(calibration_rows, plan_rows)
    # Whole blocks, as the shards embed them, so the calibration rows are the corpus's own rows bit for bit.
    stop = min(plan_rows, -(-n // block_rows) * block_rows)
    return ranges_of(_encode_rows(source, 0, stop, block_rows, embed_blocks)[:n])


@dataclasses.dataclass
class Summary:
    output_dir: str
    rows: int
    shards: int
    written_rows: int  # by this process, in this run
    seconds: float
    complete: bool

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["texts_per_second"] = round(self.written_rows / self.seconds, 1) if self.seconds > 0 else 0.0
        return out


def embed_corpus(source: store.TextSource, output_dir: str, model, precision: str = "float32",
                 shard_rows: int = DEFAULT_SHARD_ROWS, block_rows: int = DEFAULT_BLOCK_ROWS, batch_size: int = 32,
                 dtype: str = "float32", devices=None, calibration: str | None = None,
                 calibration_rows: int = DEFAULT_CALIBRATION_ROWS, progress: bool = False, process_index: int = 0,
                 process_count: int = 1) -> Summary:
    """Embed every text of `source` into `output_dir` (see corpus.py); returns what was done.

    Run it again with the same arguments after a crash: it goes on from the last complete shard.
    int8/uint8: ranges from `calibration` (.npy: [2, D] ranges or [N, D] embeddings), else from the
    first `calibration_rows` rows of the corpus (quantize.py's docstring)."""
    from minilm_jax.encode import encode_blocks, load
    from minilm_jax.checkpoint_io import Model

    t0 = time.perf_counter()
    check_precision(precision)
    for name, value in (("shard_rows", shard_rows), ("block_rows", block_rows), ("calibration_rows", calibration_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "calibration_rows" else 1):
            raise UsageError(f"{name.replace('_', '-')} must be a positive integer"
                             f"{' of at least 2' if name == 'calibration_rows' else ''}, got {value!r}")
    if shard_rows % block_rows:
        block_rows = next(b for b in range(min(block_rows, shard_rows), 0, -1) if shard_rows % b == 0)
    if calibration is not None and precision not in CALIBRATED:
        raise UsageError(f"--calibration is for --precision int8 or uint8, not {precision}")
    if not isinstance(model, Model):
        model = load(model)
    os.makedirs(output_dir, exist_ok=True)
    scanned = source.scan()  # every row checked before anything is embedded
    plan = store.Plan(model.path, store.model_fingerprint(model), precision, model.config.hidden_size,
                      scanned["rows"], shard_rows, tuple(scanned["inputs"]), scanned["fingerprint"],
                      id_column=source.id_column, id_kind=scanned["ids"])
    existing = store.read_manifest(output_dir)
    if existing is not None:
        store.check_same_corpus(store.Plan.from_manifest(existing), plan, output_dir)
        if existing.get("complete"):
            store.Corpus.open(output_dir, verify=False)
            return Summary(output_dir, plan.rows, plan.n_shards, 0, time.perf_counter() - t0, True)

    mine = [i for i in range(plan.n_shards) if i % process_count == process_index]
    # A run killed mid-write left temporary files; each process removes those of the files only it writes.
    store.remove_unfinished(output_dir, {store.shard_name(i) + ext for i in mine for ext in (".npy", ".ids.npy", ".json")}
                            | ({store.MANIFEST, store.RANGES} if process_index == 0 else set()))

    def embed_blocks(blocks):  # each block's float32 embeddings, as encode(block) gives them, pipelined
        return encode_blocks(blocks, model, batch_size=batch_size, dtype=dtype, devices=devices)

    ranges = None
    if precision in CALIBRATED:
        ranges_path = os.path.join(output_dir, store.RANGES)
        if existing is not None and existing.get("ranges"):
            if store.sha256_file(ranges_path) != existing["ranges"]["sha256"]:
                raise UserError(f"{ranges_path} differs from the one the shards were quantized with; restore it or "
                                "embed into another --output-dir")
        elif process_index == 0:
            computed = _calibration_ranges(source, plan.rows, calibration, calibration_rows, block_rows, plan.dim,
                                           embed_blocks)
            store.atomic_write(ranges_path, store.npy_bytes(computed))
        _barrier("minilm-jax-corpus-ranges", process_count)
        ranges = np.load(ranges_path, allow_pickle=False)
        plan = dataclasses.replace(plan, ranges_sha256=store.sha256_file(ranges_path))
    if existing is None and process_index == 0:
        store.write_manifest(output_dir, plan)

    todo = [i for i in mine if store.shard_record(output_dir, plan, i) is None]
    todo_rows = sum(b - a for a, b in map(plan.shard_range, todo))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        mine_rows = sum(b - a for a, b in map(plan.shard_range, mine))
        bar = tqdm(total=mine_rows, initial=mine_rows - todo_rows, unit="texts", desc="Embedding", smoothing=0.1)

    block_ids = collections.deque()  # with an id column, each block's ids, from its reading to its shard's writing

    def todo_blocks():  # the texts of the shards to embed, in blocks that never straddle two shards
        rows, at = source.rows(), 0
        for index in todo:
            start, stop = plan.shard_range(index)
            collections.deque(itertools.islice(rows, start - at), maxlen=0)  # skip the rows of other shards
            for block in store.blocks(rows, start, stop, block_rows):
                texts, ids = zip(*block)
                if plan.id_column is not None:
                    block_ids.append(ids)
                yield texts
            at = stop

    t_embed = time.perf_counter()
    embedded = embed_blocks(todo_blocks())
    try:
        for index in todo:
            start, stop = plan.shard_range(index)
            buffer = np.empty((stop - start, plan.width), plan.dtype)
            ids, done = [], 0
            while done < stop - start:
                block = next(embedded)
                buffer[done:done + len(block)] = quantize(block, precision, ranges)
                if block_ids:
                    ids.extend(block_ids.popleft())
                done += len(block)
                if bar is not None:
                    bar.update(len(block))
            store.write_shard(output_dir, plan, index, buffer,
                              store.ids_array(ids, plan.id_kind) if plan.id_column is not None else None)
            del buffer, ids
    finally:
        embedded.close()  # its threads end with it
    seconds = time.perf_counter() - t_embed
    if bar is not None:
        bar.close()
    _barrier("minilm-jax-corpus-shards", process_count)
    complete = False
    if process_index == 0:
        records = []
        for i in range(plan.n_shards):
            record = store.shard_record(output_dir, plan, i)
            if record is None:
                raise UserError(f"{output_dir}/{store.shard_name(i)}.json is missing after every process finished: "
                                "with several processes the output folder must be one shared folder")
            records.append({k: record[k] for k in ("file", "start", "stop", "bytes", "sha256", "ids_file", "ids_sha256")
                            if k in record})
        store.write_manifest(output_dir, plan, records)
        complete = True
    return Summary(output_dir, plan.rows, plan.n_shards, todo_rows, seconds if todo_rows else time.perf_counter() - t0,
                   complete)

