"""Validated pairs -> shuffled, packed training batches laid out per device ([local devices, ...],
as `jax.pmap` takes them).

The batch of step s is a pure function of (seed, s): the epoch's permutation comes from
(seed, epoch) and the batch is a slice of it. So a resumed run needs no saved data position
beyond the step number, and every host of a multi-host job computes the same global batch and
keeps its own devices' share.

Both sentences of a pair go through the encoder in one forward pass, packed: a device's 2b
sentences are laid several to a row (first-fit decreasing), each attending only to itself and
with positions restarting at 0, so almost no compute goes to padding (sentence-transformers pads
each side to its longest sentence: about twice the real tokens on Quora).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from minilm_jax.pairs import Pairs
from minilm_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    ids1: list  # int32 arrays, unpadded
    ids2: list
    labels: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.labels)


def tokenize_pairs(pairs: Pairs, tokenizer: Tokenizer) -> TokenizedPairs:
    return TokenizedPairs(tokenizer.token_ids(pairs.sentence1), tokenizer.token_ids(pairs.sentence2),
                          pairs.scores.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How one global batch is cut: into `global_devices` equal shares, this host holding
    devices [first_device, first_device + local_devices)."""

    batch_size: int  # global pairs per step
    global_devices: int = 1
    local_devices: int = 1
    first_device: int = 0

    @property
    def pairs_per_device(self) -> int:
        return self.batch_size // self.global_devices


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    # The last, short batch is kept (sentence-transformers' dataloader keeps it too).
    return math.ceil(n_pairs / batch_size)


@functools.lru_cache(maxsize=4)
def epoch_permutation(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: every step of an epoch slices the same permutation.
    order = np.random.default_rng([seed, epoch]).permutation(n_pairs)
    order.flags.writeable = False
    return order


def batch_indices(n_pairs: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the pairs of global step `step` (0-based)."""
    epoch, i = divmod(step, steps_per_epoch(n_pairs, batch_size))
    return epoch_permutation(n_pairs, seed, epoch)[i * batch_size:(i + 1) * batch_size]


PACK_LENGTHS = (64, 128, 256, 512)  # row lengths of packed batches
# Packed row counts are rounded up to this. 1 (no rounding) computes 13% fewer tokens than 4 at
# batch 16 (1.09x the real tokens against 1.26x; a CPU step 10% faster) for 10 compiled shapes
# over a Quora epoch instead of 5; the persistent compilation cache keeps them across runs.
ROW_MULTIPLE = 1


def pack_sentences(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: which sentences share each packed row of `row_length` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if space >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


def _device_sentences(data: TokenizedPairs, indices: np.ndarray, layout: BatchLayout, device: int) -> list:
    """The 2b sentences of one device: its pairs' sentence1 rows, then their sentence2 rows."""
    b = layout.pairs_per_device
    mine = indices[device * b:(device + 1) * b]
    return [data.ids1[i] for i in mine] + [data.ids2[i] for i in mine]


def make_batch(data: TokenizedPairs, indices: np.ndarray, layout: BatchLayout, row_length: int, n_rows: int,
               packing: list) -> dict:
    """Packed arrays for this host's devices: ids/positions/segments/slots [local_devices, n_rows, row_length]
    (slot = the sentence's index among the device's 2b sentences, 2b for padding), labels/weights
    [local_devices, b], count [local_devices] (real pairs in the global batch: the loss's denominator)."""
    b = layout.pairs_per_device
    n_local = layout.local_devices
    shape = (n_local, n_rows, row_length)
    ids, positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    slots = np.full(shape, 2 * b, np.int32)
    labels = np.zeros((n_local, b), np.float32)
    weights = np.zeros((n_local, b), np.float32)
    for d in range(n_local):
        device = layout.first_device + d
        sentences = _device_sentences(data, indices, layout, device)
        n_pairs = len(sentences) // 2
        for r, members in enumerate(packing[d]):
            at = 0
            for seg, i in enumerate(members, start=1):
                row = sentences[i]
                # A short final batch has fewer pairs: its sentence2 rows still go to slots b + pair.
                slot = i if i < n_pairs else b + (i - n_pairs)
                ids[d, r, at:at + len(row)] = row
                positions[d, r, at:at + len(row)] = np.arange(len(row))
                segments[d, r, at:at + len(row)] = seg
                slots[d, r, at:at + len(row)] = slot
                at += len(row)
        mine = indices[device * b:(device + 1) * b]
        labels[d, :len(mine)] = data.labels[mine]
        weights[d, :len(mine)] = 1.0
    count = np.full((n_local,), float(len(indices)), np.float32)
    return {"ids": ids, "positions": positions, "segments": segments, "slots": slots, "labels": labels,
            "weights": weights, "count": count}


def dispatch_groups(data: TokenizedPairs, layout: BatchLayout, seed: int, start_step: int, end_step: int,
                    steps_per_dispatch: int = 1) -> Iterator[tuple[int, int, dict]]:
    """(first_step, n_steps, arrays) for steps [start_step, end_step), `steps_per_dispatch` at a time.

    Arrays get a step axis after the device axis ([local_devices, n_steps, ...]). All steps and
    devices of a group share one (rows, row length) shape, taken from the most demanding of them,
    so they stack and so every device runs the same program.
    """
    n = len(data)
    for first in range(start_step, end_step, steps_per_dispatch):
        steps = range(first, min(first + steps_per_dispatch, end_step))
        indices = [batch_indices(n, layout.batch_size, seed, s) for s in steps]
        # Every host must pick the same shape, so the shape comes from all devices of the global
        # batch; default=0: a short last batch can leave a device with no pairs at all.
        all_lengths = [[[len(x) for x in _device_sentences(data, idx, layout, d)]
                        for d in range(layout.global_devices)] for idx in indices]
        longest = max(max(ls, default=0) for per_step in all_lengths for ls in per_step)
        row_length = next((p for p in PACK_LENGTHS if p >= longest), longest)
        all_packings = [[pack_sentences(ls, row_length) for ls in per_step] for per_step in all_lengths]
        n_rows = max(len(p) for per_step in all_packings for p in per_step)
        n_rows = max(ROW_MULTIPLE, -(-n_rows // ROW_MULTIPLE) * ROW_MULTIPLE)
        mine = slice(layout.first_device, layout.first_device + layout.local_devices)
        packings = [per_step[mine] for per_step in all_packings]
        batches = [make_batch(data, idx, layout, row_length, n_rows, packing)
                   for idx, packing in zip(indices, packings)]
        yield first, len(steps), {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}


def prefetch(iterator: Iterator, depth: int = 3) -> Iterator:
    """Run `iterator` on a background thread, `depth` items ahead, so the device never waits for
    tokenised, padded batches. Exceptions are re-raised in the consumer."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put(item)
        except BaseException as e:  # handed to the consumer, which raises it
            items.put(e)
        items.put(done)

    thread = threading.Thread(target=produce, daemon=True, name="minilm-jax-batches")
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
