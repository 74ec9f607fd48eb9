"""train.py's memory settings (minilm_jax/host_memory.py): a step's temporaries stay mapped from one
execution to the next, and the settings change nothing that is computed.

- In a fresh process, a program with a 64 MB temporary run again and again faults its pages in on
  every run with glibc's and JAX's defaults, and (in the median run) not after keep_step_memory().
- train.py with the settings and with MINILM_JAX_SYSTEM_MALLOC=1 (glibc's and JAX's defaults)
  trains to the same bytes: the same exported weights and the same logged losses.
- A run holds one copy of the weights (the train state's) and gives memory back when it switches
  between its two programs, whose temporaries would otherwise both stay mapped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, write_subset
from tiny_model import write_tiny_model

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

_FAULTS = r"""
import resource, sys
from minilm_jax.host_memory import keep_step_memory
made = keep_step_memory()
import jax, jax.numpy as jnp

@jax.jit
def program(a, b, v):
    return (a @ b) @ v  # a @ b is a [4096, 4096] float32 temporary: 64 MB

a, b, v = jnp.ones((4096, 64)), jnp.ones((64, 4096)), jnp.ones((4096,))
for _ in range(3):
    program(a, b, v).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    program(a, b, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median run: the heap may still grow once in a while (a block split by a later allocation).
print(made, sorted(faults)[len(faults) // 2])
"""


def _faults_per_run(system_malloc: bool) -> tuple[bool, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("MINILM_JAX_SYSTEM_MALLOC", None)
    if system_malloc:
        env["MINILM_JAX_SYSTEM_MALLOC"] = "1"
    proc = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made, faults = proc.stdout.split()
    return made == "True", float(faults)


def test_a_program_s_temporaries_stay_mapped():
    made, kept = _faults_per_run(system_malloc=False)
    not_made, defaults = _faults_per_run(system_malloc=True)
    assert made and not not_made
    # 64 MB is 16,384 pages of 4 KiB: faulted in again on every run with the defaults.
    assert defaults > 5_000, defaults
    assert kept < defaults / 10, (kept, defaults)


def test_train_py_trains_the_same_bytes_with_and_without_the_settings(model_path, data_dir, tmp_path):
    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 160)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MINILM_JAX_CACHE_DIR": str(tmp_path / "xla"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("MINILM_JAX_SYSTEM_MALLOC", None)
    outputs = {}
    for name, extra in (("settings", {}), ("defaults", {"MINILM_JAX_SYSTEM_MALLOC": "1"})):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--model", tiny, "--train-file", str(train),
                               "--output-dir", str(out), "--max-steps", "8", "--log-every", "1", "--no-progress"],
                              env={**env, **extra}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        outputs[name] = ((out / "model" / "model.safetensors").read_bytes(), losses)
    assert len(outputs["settings"][1]) == 8
    assert outputs["settings"][1] == outputs["defaults"][1]
    assert outputs["settings"][0] == outputs["defaults"][0]


def test_a_run_holds_one_copy_of_the_weights_and_one_program_s_temporaries(model_path, data_dir, tmp_path,
                                                                           monkeypatch):
    """In the loop, the loaded weights are gone: the train state on the devices is their only copy.
    Before every step that runs the other program, the memory freed is given back, so that the
    fast step's temporaries are not held beside the general step's (which set the run's peak)."""
    import gc
    import weakref

    import jax

    from minilm_jax import train_lib

    tiny = write_tiny_model(model_path, str(tmp_path / "tiny"))
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 400)
    loaded, events = [], []
    prepare, with_rates = train_lib.prepare_model, train_lib.with_learning_rates

    def prepare_model(cfg):
        model = prepare(cfg)
        loaded.extend(weakref.ref(x) for x in jax.tree.leaves(model.params))
        return model

    def dispatched(dispatch, rates, steps):
        gc.collect()
        events.append(("dispatch", dispatch.program, sum(ref() is not None for ref in loaded)))
        return with_rates(dispatch, rates, steps)

    monkeypatch.setattr(train_lib, "prepare_model", prepare_model)
    monkeypatch.setattr(train_lib, "with_learning_rates", dispatched)
    monkeypatch.setattr(train_lib, "release_freed_memory", lambda: events.append(("release",)))
    # --packed-tokens 512 (8 rows of 64): about a third of the steps take the general program.
    cfg = train_lib.TrainConfig(model=tiny, train_file=(str(train),), output_dir=str(tmp_path / "out"), max_steps=12,
                                packed_tokens=512, log_every=1)
    final = train_lib.train_and_evaluate(cfg, progress=False)
    dispatches = [e for e in events if e[0] == "dispatch"]
    assert len(dispatches) == 12 and 0 < final["general_steps"] < 12
    assert len(loaded) > 10 and all(alive == 0 for _, _, alive in dispatches)
    switches = 0
    for i, event in enumerate(events):
        if event[0] != "dispatch":
            continue
        before = [e for e in events[:i] if e[0] == "dispatch"]
        if before and before[-1][1] != event[1]:
            switches += 1
            assert events[i - 1] == ("release",), f"no release before dispatch {len(before)} ({event[1]})"
    assert switches >= 2
