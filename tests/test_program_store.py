"""The program store (minilm_jax/program_store.py): compiled programs saved whole, loaded by a rerun
without tracing.

- A program JAX's own cache already holds is compiled afresh for the store, and the stored copy runs
  (a copy of a program loaded from JAX's cache fails when run: "Function ... not found").
- A rerun loads it from the store and computes the same bytes; a damaged file is compiled again and
  replaced; another description misses.
- The key changes with the description, the shapes and XLA_FLAGS, and a description with an object's
  address in it is not stored.
Each run is a fresh process: JAX reads its cache settings once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT

_RUN = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from minilm_jax.compilation_cache import enable_compilation_cache
from minilm_jax.ahead_of_time import AheadOfTime

enable_compilation_cache()
stored_as = sys.argv[1] or None

def program(x):  # fusions and a sort: kernels a copy of a program loaded from JAX's cache lacks
    return jnp.sort(x * 2.0 + jnp.arange(x.shape[0])) @ jnp.ones((x.shape[0], 3))

compiler = AheadOfTime(threads=1)
x = np.linspace(-1, 1, 37).astype(np.float32)
compiler.submit("p", jax.jit(program), jax.ShapeDtypeStruct(x.shape, x.dtype), stored_as=stored_as)
out = np.asarray(compiler.get("p")(x))
compiler.close()
print(json.dumps({"out": out.tolist(), **compiler.report()}))
"""


def _run(cache, stored_as: str | None) -> dict:
    env = {**os.environ, "MINILM_JAX_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _RUN, stored_as or ""], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stored(cache) -> list:
    folder = cache.parent / (cache.name + "-programs")
    return sorted(folder.glob("*.program")) if folder.is_dir() else []


def test_a_rerun_loads_the_program_whole_and_a_damaged_one_is_replaced(tmp_path):
    cache = tmp_path / "xla"
    plain = _run(cache, None)  # JAX's cache now holds the program
    assert plain["compiled_programs"] == 1 and not _stored(cache)

    first = _run(cache, "program v1")
    assert first["compiled_programs"] == 1 and first["cached_programs"] == 0  # not taken from JAX's cache
    (entry,) = _stored(cache)
    again = _run(cache, "program v1")
    assert again["compiled_programs"] == 0 and again["cached_programs"] == 1
    for result in (first, again):
        assert np.array_equal(np.asarray(result["out"], np.float32), np.asarray(plain["out"], np.float32))

    blob = bytearray(entry.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    entry.write_bytes(bytes(blob))
    repaired = _run(cache, "program v1")
    assert repaired["compiled_programs"] == 1 and repaired["out"] == plain["out"]
    assert _stored(cache) == [entry] and entry.read_bytes() != bytes(blob)
    assert _run(cache, "program v1")["cached_programs"] == 1

    other = _run(cache, "program v2")  # another description: another program
    assert other["compiled_programs"] == 1 and len(_stored(cache)) == 2


def test_the_key_follows_what_defines_the_program(monkeypatch):
    import jax

    from minilm_jax import program_store

    x = jax.ShapeDtypeStruct((4, 3), np.float32)
    key = program_store.program_key("step v1", x)
    assert key is not None and key == program_store.program_key("step v1", x)
    assert key != program_store.program_key("step v2", x)
    assert key != program_store.program_key("step v1", jax.ShapeDtypeStruct((4, 5), np.float32))
    assert key != program_store.program_key("step v1", jax.ShapeDtypeStruct((4, 3), np.float16))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert key != program_store.program_key("step v1", x)
    assert program_store.program_key(f"step {object()!r}", x) is None  # an address: not the same next run


def test_no_key_where_the_code_on_disk_does_not_say_what_runs(monkeypatch):
    """A function of the package replaced at run time (the non-finite test's poisoned loss) or
    MINILM_JAX_PROGRAM_STORE=off: nothing is stored or loaded."""
    import jax

    from minilm_jax import losses, program_store

    x = jax.ShapeDtypeStruct((4, 3), np.float32)
    assert program_store.program_key("step v1", x) is not None
    monkeypatch.setenv("MINILM_JAX_PROGRAM_STORE", "off")
    assert program_store.program_key("step v1", x) is None
    monkeypatch.delenv("MINILM_JAX_PROGRAM_STORE")
    real = losses.cosine_mse_terms
    monkeypatch.setattr(losses, "cosine_mse_terms", lambda *args: real(*args) * 2)
    assert program_store.program_key("step v1", x) is None
