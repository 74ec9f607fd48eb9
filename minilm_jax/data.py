"""Validated pairs -> shuffled, padded training batches laid out for `jax.pmap`.

The batch of step s is a pure function of (seed, s): the epoch's permutation comes from
(seed, epoch) and the batch is a slice of it. So a resumed run needs no saved data position
beyond the step number, and every host of a multi-host job computes the same global batch and
keeps its own devices' share.

Both sentences of a pair go through the encoder in one forward pass: a device's rows are
[its sentence1 rows; its sentence2 rows], all padded to one bucket length.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from minilm_jax.pairs import Pairs
from minilm_jax.tokenizer import Tokenizer, bucket_length, bucket_lengths


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


def epoch_permutation(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)


def batch_indices(n_pairs: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the pairs of global step `step` (0-based)."""
    epoch, i = divmod(step, steps_per_epoch(n_pairs, batch_size))
    return epoch_permutation(n_pairs, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def make_batch(data: TokenizedPairs, indices: np.ndarray, layout: BatchLayout, length: int) -> dict:
    """Arrays for this host's devices: ids/mask [local_devices, 2*b, length], labels/weights [local_devices, b],
    count [local_devices] (the number of real pairs in the global batch, the loss's denominator)."""
    b = layout.pairs_per_device
    n_local = layout.local_devices
    ids = np.zeros((n_local, 2 * b, length), np.int32)
    mask = np.zeros((n_local, 2 * b, length), np.int32)
    labels = np.zeros((n_local, b), np.float32)
    weights = np.zeros((n_local, b), np.float32)
    for d in range(n_local):
        first = (layout.first_device + d) * b
        for r, pair in enumerate(indices[first:first + b]):
            for side, row in ((0, data.ids1[pair]), (1, data.ids2[pair])):
                ids[d, side * b + r, :len(row)] = row
                mask[d, side * b + r, :len(row)] = 1
            labels[d, r] = data.labels[pair]
            weights[d, r] = 1.0
    count = np.full((n_local,), float(len(indices)), np.float32)
    return {"ids": ids, "mask": mask, "labels": labels, "weights": weights, "count": count}


def pair_length(data: TokenizedPairs, indices: Sequence[int]) -> int:
    return max(max(len(data.ids1[i]), len(data.ids2[i])) for i in indices)


def dispatch_groups(data: TokenizedPairs, layout: BatchLayout, seed: int, max_seq_length: int,
                    start_step: int, end_step: int, steps_per_dispatch: int = 1) -> Iterator[tuple[int, int, dict]]:
    """(first_step, n_steps, arrays) for steps [start_step, end_step), `steps_per_dispatch` at a time.

    Arrays get a step axis after the device axis ([local_devices, n_steps, ...]); all steps of a
    group share the longest step's bucket length so that they stack.
    """
    buckets = bucket_lengths(max_seq_length)
    n = len(data)
    for first in range(start_step, end_step, steps_per_dispatch):
        steps = range(first, min(first + steps_per_dispatch, end_step))
        indices = [batch_indices(n, layout.batch_size, seed, s) for s in steps]
        length = bucket_length(max(pair_length(data, idx) for idx in indices), buckets)
        batches = [make_batch(data, idx, layout, length) for idx in indices]
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
