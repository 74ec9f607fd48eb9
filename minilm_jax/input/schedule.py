"""Which dataset each step draws its whole batch from: a pure function of (seed, step) and the
datasets' batch counts, so a resumed run needs no saved state for it.

- one dataset: every step;
- `proportional` (sentence-transformers' MultiDatasetBatchSamplers.PROPORTIONAL): an epoch holds
  each dataset's batches (ceil(rows / batch)), in an order drawn per epoch: every row once per epoch;
- `round-robin` (ROUND_ROBIN): datasets in turn, 0, 1, ..., D-1, 0, ...; the epoch ends with the
  smallest dataset: min(batches) * D steps, as sentence-transformers' zip over its samplers;
- `weighted`: each step draws its dataset with probability weight / sum(weights), from
  (seed, step): endless, as all-MiniLM-L6-v2 was trained. Its epoch, where one is asked for (no
  --max-steps), is as long as the proportional one.

sentence-transformers draws its order with torch's generator; this one with numpy's
(`default_rng([seed, epoch, ...])`), so the orders differ, the counts and rules do not.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

_PROPORTIONAL, _WEIGHTED = 1 << 21, 1 << 22  # rng keys of their own


class Schedule:
    def __init__(self, sampler: str, weights: Sequence[float], seed: int, batches: Sequence[int] | None):
        """batches: each dataset's batches per epoch (None where the rows were not counted)."""
        self.sampler, self.seed, self.n = sampler, seed, len(weights)
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.batches = None if batches is None else [int(b) for b in batches]
        if self.n > 1 and sampler in ("proportional", "round-robin") and batches is None:
            raise AssertionError("proportional and round-robin need every dataset's batch count")

    @property
    def steps_per_epoch(self) -> int | None:
        if self.batches is None:
            return None
        if self.n == 1 or self.sampler != "round-robin":
            return sum(self.batches)
        return min(self.batches) * self.n

    def dataset_of(self, step: int) -> int:
        if self.n == 1:
            return 0
        if self.sampler == "weighted":
            return int(self._rng(_WEIGHTED, step).choice(self.n, p=self.weights))
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.sampler == "round-robin":
            return i % self.n
        return int(self._proportional_order(epoch)[i])

    def epoch_of(self, step: int) -> int | None:
        """The epoch `step` (0-based) belongs to."""
        spe = self.steps_per_epoch
        return None if not spe else step // spe

    def epoch_float(self, steps_done: int) -> float | None:
        spe = self.steps_per_epoch
        return None if not spe else steps_done / spe

    def ends_epoch(self, first: int, n: int) -> bool:
        spe = self.steps_per_epoch
        return bool(spe) and (first + n) // spe > first // spe

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    @functools.lru_cache(maxsize=2)
    def _proportional_order(self, epoch: int) -> np.ndarray:
        order = np.repeat(np.arange(self.n), self.batches)
        return order[self._rng(_PROPORTIONAL, epoch).permutation(len(order))]

