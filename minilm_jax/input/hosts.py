"""What the hosts of a multi-host run tell each other about their input: each host reads only its own
share, so the few facts every host needs (row counts, whether a step fits the fast shape, the
streams' positions for a checkpoint, and with no duplicates the texts the lower hosts' shards took in
a step) go through the distributed runtime's key-value store, the
channel jax.distributed already opened (no collective on the devices, no step waits for it).
"""

from __future__ import annotations

import json

import jax

# Keys of a dispatch's fit are deleted this many dispatches later: by then every host has read them
# (no host's batch thread runs more than its prefetch depth ahead of the steps all hosts take together).
_KEEP_DISPATCHES = 64


def _client():
    from jax._src import distributed as jax_distributed  # the runtime client: no public accessor

    return jax_distributed.global_state.client


def exchange(key: str, value) -> list:
    """Every process's `value` (JSON), in process order; a single process gets [value]."""
    if jax.process_count() == 1:
        return [value]
    from minilm_jax.distributed import barrier_seconds

    client, me = _client(), jax.process_index()
    client.key_value_set(f"minilm_jax/input/{key}/{me}", json.dumps(value))
    return [json.loads(client.blocking_key_value_get(f"minilm_jax/input/{key}/{p}", barrier_seconds() * 1000))
            for p in range(jax.process_count())]


class FitAgreement:
    """Whether each step of a dispatch needs the general program on some host: every host's flags,
    ORed. Called on the batch thread, in dispatch order."""

    def __init__(self):
        self._sent: list[str] = []

    def __call__(self, first_step: int, flags: list[bool]) -> list[bool]:
        values = exchange(f"fit/{first_step}", [bool(f) for f in flags])
        self._sent.append(f"minilm_jax/input/fit/{first_step}/{jax.process_index()}")
        if len(self._sent) > _KEEP_DISPATCHES:
            _client().key_value_delete(self._sent.pop(0))
        return [any(v[i] for v in values) for i in range(len(flags))]


class TextChain:
    """No text twice in a step's global batch across hosts: process p learns the texts (text_key) the
    shards of processes 0..p-1 took in the step, and passes them on with its own to process p + 1,
    which deletes the key once read (it has no other reader). Called on the batch thread, in step
    order; a process waits only for the one before it, whose batch thread runs ahead of the steps
    as its own does."""

    @staticmethod
    def _key(dataset: int, step: int, process: int) -> str:
        return f"minilm_jax/input/texts/{dataset}/{step}/{process}"

    def lower(self, dataset: int, step: int) -> set[str]:
        me = jax.process_index()
        if me == 0:
            return set()
        from minilm_jax.distributed import barrier_seconds

        key = self._key(dataset, step, me - 1)
        taken = json.loads(_client().blocking_key_value_get(key, barrier_seconds() * 1000))
        _client().key_value_delete(key)
        return set(taken)

    def pass_on(self, dataset: int, step: int, taken: set[str]) -> None:
        if jax.process_index() < jax.process_count() - 1:
            _client().key_value_set(self._key(dataset, step, jax.process_index()), json.dumps(sorted(taken)))
