"""Validated pairs -> shuffled, packed training batches laid out per device ([local devices, ...],
as `jax.pmap` takes them).

The batch of step s is a pure function of (seed, s): the epoch's permutation comes from
(seed, epoch) and the batch is a slice of it. So a resumed run needs no saved data position
beyond the step number, and every host of a multi-host job computes the same global batch and
keeps its own devices' share.

Both sentences of a pair (and any hard negatives) go through the encoder in one forward pass,
packed: a device's sentences are laid several to a row (first-fit decreasing), each attending only
to itself and with positions restarting at 0, so little compute goes to padding
(sentence-transformers pads each side to its longest sentence: about twice the real tokens on
Quora). The packed arrays have one of two shapes fixed from the options (`StepShapes`), never from
the data, so the train step compiles before the data is read and at most twice per run.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Iterator, Sequence

import numpy as np

from minilm_jax.pairs import Pairs
from minilm_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of every row's texts, one list per column (sentence1, sentence2, then any hard
    negatives), unpadded int32 arrays; and the rows' labels."""

    columns: tuple  # of lists of int32 arrays, all of the same length
    labels: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def ids1(self) -> list:
        return self.columns[0]

    @property
    def ids2(self) -> list:
        return self.columns[1]


def tokenize_pairs(pairs: Pairs, tokenizer: Tokenizer, prompts: Sequence[str] = ()) -> TokenizedPairs:
    """`prompts`: a text put before every text of each column (sentence-transformers' `prompts`
    training argument), in column order; () or "" for none."""
    columns = pairs.columns()
    prompts = tuple(prompts) + ("",) * (len(columns) - len(prompts))
    return TokenizedPairs(tuple(tokenizer.token_ids([prompt + t for t in column] if prompt else column)
                                for prompt, column in zip(prompts, columns)),
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


class BatchPlan:
    """Which rows every step takes, a pure function of (seed, step), and where the epochs end.

    Shuffled: each epoch is a permutation from (seed, epoch) cut into consecutive batches
    (batch_indices). No duplicates (`text_ids` given; sampler.no_duplicates_batches,
    sentence-transformers' NO_DUPLICATES): no batch holds a text twice, across all its columns.
    Such an epoch can have more batches than ceil(rows / batch) when texts repeat, so its length is
    known once it is drawn; epochs are drawn as steps reach them.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, text_ids: np.ndarray | None = None):
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self._text_ids = text_ids
        self._epochs: list = []  # per epoch: its batches (no duplicates), or None (shuffled)
        self._starts = [0]  # first step of each epoch drawn so far, and the end of the last one

    def _draw(self) -> None:
        if self._text_ids is None:
            self._epochs.append(None)
            self._starts.append(self._starts[-1] + steps_per_epoch(self.n_rows, self.batch_size))
        else:
            from minilm_jax.sampler import no_duplicates_batches

            batches = no_duplicates_batches(self._text_ids, self.batch_size, self.seed, len(self._epochs))
            self._epochs.append(batches)
            self._starts.append(self._starts[-1] + len(batches))

    def epoch_start(self, epoch: int) -> int:
        """The first step of `epoch` (= the steps of all epochs before it)."""
        while len(self._starts) <= epoch:
            self._draw()
        return self._starts[epoch]

    def _locate(self, step: int) -> tuple[int, int]:
        while self._starts[-1] <= step:
            self._draw()
        epoch = bisect.bisect_right(self._starts, step) - 1
        return epoch, step - self._starts[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The rows of global step `step` (0-based)."""
        epoch, i = self._locate(step)
        if self._epochs[epoch] is None:
            return batch_indices(self.n_rows, self.batch_size, self.seed, step)
        return self._epochs[epoch][i]

    def epoch_of(self, steps_done: int) -> float:
        """Epochs completed after `steps_done` steps, fractional within an epoch."""
        epoch, i = self._locate(steps_done)
        return epoch + i / (self._starts[epoch + 1] - self._starts[epoch])

    def ends_epoch(self, first: int, n: int) -> bool:
        """Whether steps [first, first + n) finish an epoch."""
        self._locate(first + n)
        return any(first < end <= first + n for end in self._starts[1:])


# ----------------------------------------------------------------------------- the two packed shapes

# Rows of the packed shape most steps run in. 64 tokens hold any two average sentences (15 tokens
# on Quora and STS-B) and keep attention cheap: a CPU step at 640 tokens took 322 ms in rows of 64,
# 349 in rows of 128 and, at 768 tokens, 511 in rows of 256.
FAST_ROW_LENGTH = 64
# The default token budget of that shape, per sentence of a device's share of the step. At batch
# 16 (32 sentences: 9 rows of 64) 89% of the Quora recipe's steps fit it and 94% of STS-B's; a step
# that does not (too many tokens, or a sentence longer than a row) runs in the general shape, which
# cost 1.5x a fast step of 10 rows. 10 rows (20 per sentence) fit 96% of Quora's steps but make
# every fast step 15% dearer: measured, 9 rows are 8% faster on Quora and 10% on STS-B; 8 rows
# (58% fit) are slower.
TOKENS_PER_SENTENCE = 18


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The shapes of one device's share of a train step, fixed from the options before any data is
    read, so that a run compiles at most two train programs, and a rerun none.

    - fast: one packed batch of `fast_rows` rows of `fast_length` tokens, for the steps whose
      sentences fit (almost all of them);
    - general: up to `micro_batches` micro-batches of `micro_rows` rows of `micro_length` (the
      longest sentence) tokens, run one after the other with the embeddings' gradient cached
      between them (GradCache), which gives the same loss and gradient for any step.
    Slots: sentence i of column c (sentence1, sentence2, negatives...) is slot c * pairs + i;
    slot `sentences` is padding.
    """

    pairs: int  # pairs (rows of the data) per device and step
    columns: int
    fast_rows: int
    fast_length: int
    micro_rows: int
    micro_length: int
    micro_batches: int

    @property
    def sentences(self) -> int:
        return self.columns * self.pairs

    @property
    def programs(self) -> tuple[str, ...]:
        """The programs these shapes can need, the usual one first."""
        return ("fast", "general") if self.fast_rows else ("general",)


def step_shapes(pairs_per_device: int, columns: int, max_seq_length: int, tokens_per_device: int = 0,
                mini_batch_size: int | None = None) -> StepShapes:
    """The two shapes for `pairs_per_device` rows of `columns` texts truncated at max_seq_length;
    `tokens_per_device` is the fast shape's budget (0: TOKENS_PER_SENTENCE per sentence).

    mini_batch_size (the Cached* losses, GradCache): every step runs as micro-batches of about that
    many sentences (TOKENS_PER_SENTENCE each), so that memory is bounded by the micro-batch, not
    the batch; there is no fast shape (fast_rows 0)."""
    sentences = columns * pairs_per_device
    fast_length = min(FAST_ROW_LENGTH, max_seq_length)
    if mini_batch_size:
        fast_rows = 0
        micro_rows = max(1, -(-mini_batch_size * TOKENS_PER_SENTENCE // max_seq_length))
    else:
        fast_rows = max(1, -(-(tokens_per_device or sentences * TOKENS_PER_SENTENCE) // fast_length))
        micro_rows = max(1, -(-fast_rows * fast_length // max_seq_length))
    # The worst step: every sentence max_seq_length long, one to a row.
    micro_batches = -(-sentences // micro_rows)
    return StepShapes(pairs_per_device, columns, fast_rows, fast_length, micro_rows, max_seq_length, micro_batches)


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
    """(slot, ids) of one device's sentences: its rows' sentence1 texts, then their sentence2
    texts, then each negative column's. A short final batch leaves slots out, never renumbers them."""
    b = layout.pairs_per_device
    mine = indices[device * b:(device + 1) * b]
    return [(c * b + k, column[i]) for c, column in enumerate(data.columns) for k, i in enumerate(mine)]


def _fast_packing(sentences: list, shapes: StepShapes) -> list | None:
    """The fast shape's rows for these sentences, or None if they do not fit it."""
    if not shapes.fast_rows:
        return None
    lengths = [len(ids) for _, ids in sentences]
    if max(lengths, default=0) > shapes.fast_length:
        return None
    rows = pack_sentences(lengths, shapes.fast_length)
    return rows if len(rows) <= shapes.fast_rows else None


def _fill_rows(arrays: dict, sentences: list, rows: list, row_length: int) -> None:
    """Write packed rows into ids/positions/segments/slots (flat [n_rows * row_length] views)."""
    for r, members in enumerate(rows):
        at = r * row_length
        for seg, i in enumerate(members, start=1):
            slot, ids = sentences[i]
            span = slice(at, at + len(ids))
            arrays["ids"][span] = ids
            arrays["positions"][span] = np.arange(len(ids))
            arrays["segments"][span] = seg
            arrays["slots"][span] = slot
            at += len(ids)


def _empty_rows(shape: tuple, shapes: StepShapes) -> dict:
    arrays = {k: np.zeros(shape, np.int32) for k in ("ids", "positions", "segments")}
    arrays["slots"] = np.full(shape, shapes.sentences, np.int32)
    return arrays


def fast_rows(sentences: list, rows: list, shapes: StepShapes) -> dict:
    """ids/positions/segments/slots [fast_rows, fast_length]."""
    arrays = _empty_rows((shapes.fast_rows, shapes.fast_length), shapes)
    _fill_rows({k: v.reshape(-1) for k, v in arrays.items()}, sentences, rows, shapes.fast_length)
    return arrays


def general_rows(sentences: list, shapes: StepShapes) -> dict:
    """ids/positions/segments/slots [micro_batches, micro_rows, micro_length], and micro_batches
    [] (how many of them hold sentences)."""
    arrays = _empty_rows((shapes.micro_batches, shapes.micro_rows, shapes.micro_length), shapes)
    rows = _general_packing(sentences, shapes)
    _fill_rows({k: v.reshape(-1) for k, v in arrays.items()}, sentences, rows, shapes.micro_length)
    arrays["micro_batches"] = np.int32(-(-len(rows) // shapes.micro_rows))
    return arrays


def _general_packing(sentences: list, shapes: StepShapes) -> list[list[int]]:
    return pack_sentences([len(ids) for _, ids in sentences], shapes.micro_length)


def _pair_arrays(data: TokenizedPairs, indices: np.ndarray, layout: BatchLayout, device: int) -> dict:
    """labels/weights [pairs] (weight 0: padding of a short last batch; the step sums the weights of
    every device into the loss's denominator)."""
    b = layout.pairs_per_device
    mine = indices[device * b:(device + 1) * b]
    labels, weights = np.zeros(b, np.float32), np.zeros(b, np.float32)
    labels[:len(mine)] = data.labels[mine]
    weights[:len(mine)] = 1.0
    return {"labels": labels, "weights": weights}


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The steps [first, first + n) of one device call, and the arrays of this host's devices
    ([local devices, steps, ...]).

    program 'fast': every step fits the fast shape; the arrays hold `fast`.
    program 'general': they hold `general`; with several steps per dispatch also `fast` and
    `kind` [steps] (1: run the step in the fast shape, 2: in the general one, 0: padding after the
    last step of the run, which changes nothing), so that a dispatch of fewer steps than
    steps_per_dispatch keeps the program's shape.
    """

    first: int
    n: int
    program: str
    arrays: dict


SKIP, FAST, GENERAL = 0, 1, 2  # Dispatch kinds


def _step_arrays(pair_arrays: dict, kind: int, sentences: list, packing, shapes: StepShapes, program: str,
                 steps_per_dispatch: int) -> dict:
    arrays = dict(pair_arrays)
    if shapes.fast_rows and (program == "fast" or steps_per_dispatch > 1):
        arrays["fast"] = (fast_rows(sentences, packing, shapes) if kind == FAST
                          else _empty_rows((shapes.fast_rows, shapes.fast_length), shapes))
    if program == "general":
        arrays["general"] = general_rows(sentences if kind == GENERAL else [], shapes)
        if steps_per_dispatch > 1:
            arrays["kind"] = np.int32(kind)
    return arrays


def dispatch_groups(data: TokenizedPairs, layout: BatchLayout, shapes: StepShapes, plan: BatchPlan | int,
                    start_step: int, end_step: int, steps_per_dispatch: int = 1) -> Iterator[Dispatch]:
    """The Dispatches for steps [start_step, end_step), `steps_per_dispatch` at a time.

    Every host must run the same program, so whether a step fits the fast shape is decided over the
    devices of the whole global batch (a short last batch can leave a device with no pairs at all).
    `plan`: a BatchPlan, or a seed for the shuffled plan.
    """
    plan = _as_plan(plan, data, layout)
    mine = range(layout.first_device, layout.first_device + layout.local_devices)
    for first in range(start_step, end_step, steps_per_dispatch):
        steps = range(first, min(first + steps_per_dispatch, end_step))
        per_step = []  # (indices, every device's sentences, every device's fast rows or None)
        for s in steps:
            idx = plan.indices(s)
            sentences = [_device_sentences(data, idx, layout, d) for d in range(layout.global_devices)]
            packings = [_fast_packing(x, shapes) for x in sentences]
            per_step.append((idx, sentences, None if any(p is None for p in packings) else packings))
        kinds = [FAST if packings is not None else GENERAL for _, _, packings in per_step]
        yield assemble_dispatch(first, kinds, [[(_pair_arrays(data, idx, layout, d), sentences[d],
                                                 None if packings is None else packings[d])
                                                for idx, sentences, packings in per_step] for d in mine],
                                shapes, steps_per_dispatch)


def assemble_dispatch(first: int, kinds: list[int], device_steps: list[list[tuple]], shapes: StepShapes,
                      steps_per_dispatch: int) -> Dispatch:
    """The Dispatch of the steps first, first + 1, ... whose kinds (FAST or GENERAL, decided over every
    device of the global batch) are `kinds`: device_steps[d][k] is (pair arrays, sentences, fast
    packing or None) of this host's device d in step k. A dispatch of fewer steps than
    steps_per_dispatch runs in the general program, padded with steps that change nothing."""
    program = "general" if GENERAL in kinds or len(kinds) < steps_per_dispatch else "fast"
    padding = _step_arrays(_empty_pair_arrays(shapes), SKIP, [], None, shapes, program, steps_per_dispatch)
    devices = []
    for steps in device_steps:
        arrays = [_step_arrays(pairs, kind, sentences, packing if kind == FAST else None, shapes, program,
                               steps_per_dispatch)
                  for (pairs, sentences, packing), kind in zip(steps, kinds)]
        devices.append(_stack(arrays + [padding] * (steps_per_dispatch - len(kinds))))
    return Dispatch(first, len(kinds), program, _stack(devices))


def example_dispatch(shapes: StepShapes, local_devices: int, steps_per_dispatch: int, program: str) -> dict:
    """Arrays shaped as a Dispatch's of `program` (all padding): what its program is compiled for."""
    step = _step_arrays(_empty_pair_arrays(shapes), SKIP, [], None, shapes, program, steps_per_dispatch)
    return _stack([_stack([step] * steps_per_dispatch)] * local_devices)


def general_steps(data: TokenizedPairs, layout: BatchLayout, shapes: StepShapes, plan: BatchPlan | int,
                  start_step: int, end_step: int) -> dict[int, int]:
    """The steps of [start_step, end_step) that do not fit the fast shape (on some device of the
    global batch), in order, each with the most micro-batches of the general shape a device needs
    for it; found without building any arrays."""
    plan = _as_plan(plan, data, layout)
    out = {}
    for s in range(start_step, end_step):
        idx = plan.indices(s)
        sentences = [_device_sentences(data, idx, layout, d) for d in range(layout.global_devices)]
        if any(_fast_packing(x, shapes) is None for x in sentences):
            out[s] = max(-(-len(_general_packing(x, shapes)) // shapes.micro_rows) for x in sentences)
    return out


def _as_plan(plan: BatchPlan | int, data: TokenizedPairs, layout: BatchLayout) -> BatchPlan:
    return plan if isinstance(plan, BatchPlan) else BatchPlan(len(data), layout.batch_size, plan)


def _empty_pair_arrays(shapes: StepShapes) -> dict:
    return {"labels": np.zeros(shapes.pairs, np.float32), "weights": np.zeros(shapes.pairs, np.float32)}


def _stack(trees: list) -> dict:
    """Stack dicts of arrays (nested) along a new leading axis."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([t[k] for t in trees]) for k in first}
    return np.stack(trees)
