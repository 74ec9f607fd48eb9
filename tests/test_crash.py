"""Crashes lose nothing: train.py killed with kill -9 at any moment and restarted with the same command
ends with the model an uninterrupted run gives, bit for bit; a kill during an export leaves the
previous export intact; two runs never share an output folder; a non-finite loss stops the run with
its step number and keeps the last good checkpoint.

All on a tiny BERT (2 layers, hidden 64) with the real tokenizer, 30 steps, a checkpoint every 3
steps, one CPU device. The XLA compilation cache is shared by every run of the module, so a restart
costs its imports and a cache load, not a compile.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error
from tiny_model import write_tiny_model

TRAIN = REPO_ROOT / "train.py"
STEPS, EVERY = 30, 3


@pytest.fixture(scope="module")
def setup(model_path, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    tiny = write_tiny_model(model_path, str(base / "tiny"))
    lines = (data_dir / "stsb_train.tsv").read_text(encoding="utf-8").splitlines()[:49]  # header + 48 pairs
    (base / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = dict(os.environ, MINILM_JAX_CACHE_DIR=str(base / "xla"),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    return {"base": base, "tiny": tiny, "data": base / "pairs.tsv", "env": env}


def command(setup, out: Path, *extra) -> list[str]:
    return [sys.executable, str(TRAIN), "--model", setup["tiny"], "--train-file", str(setup["data"]),
            "--score-scale", "5", "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--checkpoint-every", str(EVERY), "--keep-checkpoints", "2", "--log-every", "1", "--no-progress",
            "--seed", "7", *extra]


def run(setup, cmd, log: Path, make_trigger=None, timeout: float = 240) -> str | int:
    """Run cmd; SIGKILL it as soon as trigger(seconds since start) is true, the trigger made by
    make_trigger(output folder) just before the start. 'killed', or the exit status."""
    out = Path(cmd[cmd.index("--output-dir") + 1])
    trigger = make_trigger(out) if make_trigger else None
    start = time.monotonic()
    if os.environ.get("CRASH_DEBUG"):
        print(f"start {log.name}", file=sys.__stderr__)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=setup["env"], cwd=REPO_ROOT)
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if trigger is not None and trigger(elapsed):
                proc.kill()
                proc.wait()
                if os.environ.get("CRASH_DEBUG"):
                    print(f"killed {log.name} at {elapsed:.2f}s: {sorted(os.listdir(out)) if out.exists() else None} "
                          f"ckpt {sorted(os.listdir(out / 'checkpoints')) if (out / 'checkpoints').exists() else None}",
                          file=sys.__stderr__)
                return "killed"
            assert elapsed < timeout, f"{cmd} ran longer than {timeout} s"
            time.sleep(0.002)
        if os.environ.get("CRASH_DEBUG"):
            print(f"exit {proc.returncode} {log.name} after {time.monotonic() - start:.2f}s", file=sys.__stderr__)
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def model_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not np.array_equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run's, e.g. {different[:3]}"


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp-" in p.name or ".old-" in p.name or "orbax-checkpoint-tmp" in p.name)


def snapshot(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- kill triggers. Each is made just before its run starts (so that what earlier runs left, such as a
# checkpoint folder a kill cut short, does not fire it) and then looks at the output folder every 2 ms.

def after_seconds(seconds: float):
    return lambda out: lambda elapsed: elapsed >= seconds


def _entries(folder: Path) -> set:
    try:
        return {(e.name, e.inode()) for e in os.scandir(folder)}
    except FileNotFoundError:
        return set()


def new_entry(sub: str, predicate, delay: float):
    """Once this run has created an entry of out/sub matching predicate(name), and `delay` s later."""

    def make(out: Path):
        folder, initial, fired = out / sub, _entries(out / sub), []

        def trigger(elapsed):
            current = _entries(folder)
            # An entry left by an earlier run stops being "initial" once it is gone: the run may
            # delete it and create one of the same name, which the file system may give the same inode.
            initial.intersection_update(current)
            if not fired and any(predicate(name) for name, _ in current - initial):
                fired.append(elapsed)
            return bool(fired) and elapsed >= fired[0] + delay

        return trigger

    return make


def writing_checkpoint(delay: float):
    """While orbax writes a checkpoint: its temporary step folder exists."""
    return new_entry("checkpoints", lambda name: "tmp" in name, delay)


def exporting(delay: float):
    """While the final model folder is written: atomic_folder's temporary folder exists."""
    return new_entry(".", lambda name: name.startswith(".model.tmp-"), delay)


def at_step(step: int):
    """Once this run has logged `step` to metrics.jsonl (one record per step with --log-every 1; a
    resumed run first rewrites the file, so a new inode marks this run's records)."""

    def make(out: Path):
        path = out / "metrics.jsonl"
        initial = path.stat().st_ino if path.exists() else None

        def trigger(elapsed):
            try:
                if path.stat().st_ino == initial:
                    return False
                lines = path.read_text().splitlines()
                return any(json.loads(line).get("step", 0) >= step for line in lines[-3:] if line.endswith("}"))
            except (FileNotFoundError, ValueError):
                return False

        return trigger

    return make


def test_kill_9_at_five_moments_then_restart_gives_the_uninterrupted_result(setup):
    base = setup["base"]
    reference = base / "reference"
    rc = run(setup, command(setup, reference), base / "reference.log")
    assert rc == 0, (base / "reference.log").read_text()[-3000:]
    assert not leftovers(reference)

    out = base / "interrupted"
    rng = random.Random(20261128)
    triggers = [
        # Early enough that checkpoints are left to write on any machine (the whole run takes ~10 s here).
        ("a random moment of start-up or training", after_seconds(rng.uniform(1.5, 4.5))),
        ("while a checkpoint is written", writing_checkpoint(rng.uniform(0.0, 0.01))),
        ("at a random step", at_step(rng.randint(10, 20))),
        ("while a checkpoint is written", writing_checkpoint(rng.uniform(0.0, 0.01))),
        ("during the final export", exporting(rng.uniform(0.0, 0.005))),
    ]
    outcomes = []
    for i, (moment, trigger) in enumerate(triggers):
        result = run(setup, command(setup, out), base / f"kill{i}.log", trigger)
        assert result in ("killed", 0), (base / f"kill{i}.log").read_text()[-3000:]
        outcomes.append((moment, result))
        if (out / "model").exists():  # an export is complete or absent, never half-written
            assert (out / "model" / "model.safetensors").exists() and (out / "model" / "modules.json").exists()
    killed = [m for m, r in outcomes if r == "killed"]
    assert killed.count("while a checkpoint is written") >= 1 and "during the final export" in killed, outcomes

    rc = run(setup, command(setup, out), base / "final.log")
    assert rc == 0, (base / "final.log").read_text()[-3000:]
    assert_same_model(out / "model", reference / "model")
    assert not leftovers(out), leftovers(out)

    # A kill during a re-export leaves the previous export intact, and the next run finishes it.
    before = snapshot(out / "model")
    result = run(setup, command(setup, out), base / "reexport.log", exporting(0.0))
    assert result == "killed", "the re-export finished before it could be killed"
    assert snapshot(out / "model") == before
    rc = run(setup, command(setup, out), base / "final2.log")
    assert rc == 0, (base / "final2.log").read_text()[-3000:]
    assert_same_model(out / "model", reference / "model")
    assert not leftovers(out), leftovers(out)


def test_a_second_run_on_the_same_output_folder_is_refused(setup):
    base = setup["base"]
    out = base / "locked"
    first_log = open(base / "first.log", "w")
    first = subprocess.Popen(command(setup, out, "--max-steps", "100000", "--checkpoint-every", "100000"),
                             stdout=first_log, stderr=subprocess.STDOUT, env=setup["env"], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").exists() and f"pid {first.pid}" in (out / ".lock").read_text()):
            assert first.poll() is None, (base / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        second = subprocess.run(command(setup, out, "--max-steps", "100000", "--checkpoint-every", "100000"),
                                capture_output=True, text=True, env=setup["env"], cwd=REPO_ROOT, timeout=120)
        assert_user_error(second, 1, "is in use by another train.py", f"pid {first.pid}", "choose another --output-dir")
        assert first.poll() is None  # the first run carries on
    finally:
        first.kill()
        first.wait()
        first_log.close()


NAN_SCRIPT = """
import sys
import jax.numpy as jnp
import minilm_jax.losses as losses

SENTINEL = float(sys.argv[1])
real_terms = losses.cosine_mse_terms

def poisoned_terms(u, v, labels, weights):
    # NaN for every batch that holds the pair labelled SENTINEL: the loss and every gradient go non-finite.
    poison = jnp.where(jnp.any(labels == jnp.float32(SENTINEL)), jnp.nan, 1.0)
    return real_terms(u, v, labels, weights) * poison

losses.cosine_mse_terms = poisoned_terms
import train
sys.exit(train.main(sys.argv[2:]))
"""


def test_a_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(setup):
    from minilm_jax import data as data_lib

    base = setup["base"]
    out = base / "nan"
    rows = (base / "pairs.tsv").read_text(encoding="utf-8").splitlines()
    n = len(rows) - 1
    bad_step = 8  # 1-based; the pair poisoned is one of step 8's (each pair comes once per epoch of 12 steps)
    sentinel_row = int(data_lib.batch_indices(n, 4, 7, bad_step - 1)[0])
    assert all(sentinel_row not in data_lib.batch_indices(n, 4, 7, s) for s in range(bad_step - 1))
    sentinel = 0.123  # a label no other pair has
    a, b, _ = rows[1 + sentinel_row].split("\t")
    rows[1 + sentinel_row] = f"{a}\t{b}\t{sentinel * 5}"
    data = base / "nan.tsv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    last_good = (bad_step - 1) // EVERY * EVERY  # 6

    cmd = command(setup, out)
    cmd[cmd.index("--train-file") + 1] = str(data)
    proc = subprocess.run([sys.executable, "-c", NAN_SCRIPT, str(sentinel * 5 / 5), *cmd[2:]], capture_output=True,
                          text=True, env=setup["env"], cwd=REPO_ROOT, timeout=240)
    line = assert_user_error(proc, 1, f"non-finite loss or gradient at step {bad_step} ",
                             f"last good checkpoint: step {last_good} in {out / 'checkpoints'}")
    assert "lower --learning-rate or check the data" in line
    assert not (out / "model").exists()

    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == last_good, steps
    restored = ocp.StandardCheckpointer().restore((out / "checkpoints" / str(last_good) / "state").absolute())
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored["params"])]
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
    assert int(restored["step"]) == last_good


LIVE_WRITER = """
import sys, time
from minilm_jax.checkpoint_io import atomic_folder

with atomic_folder(sys.argv[1], overwrite=True) as tmp:
    (tmp / "big.bin").write_bytes(b"x" * 20_000_000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_atomic_folder_spares_a_live_writer_and_cleans_up_after_a_killed_one(tmp_path):
    """What a kill -9 leaves beside a model folder (a half-written `.NAME.tmp-*`, or NAME moved aside
    into `.NAME.old-*/x` between the two renames) is cleaned up, or put back, by the next write to
    it; the temporary folder of a writer that is still running is left alone (it holds a flock)."""
    from minilm_jax.checkpoint_io import atomic_folder
    from minilm_jax.errors import UserError

    out = tmp_path / "model"
    with atomic_folder(str(out)) as tmp:
        (tmp / "weights").write_text("first")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=REPO_ROOT)
    try:
        live = Path(writer.stdout.readline().strip())
        assert live.parent == tmp_path and live.name.startswith(".model.tmp-") and live.is_dir()
        with atomic_folder(str(out), overwrite=True) as tmp:  # another write meanwhile: it must spare `live`
            (tmp / "weights").write_text("second")
        assert live.is_dir() and (out / "weights").read_text() == "second"
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert live.is_dir()  # killed mid-write: its temporary folder is left...
    with atomic_folder(str(out), overwrite=True) as tmp:  # ...until the next write to the same target
        (tmp / "weights").write_text("third")
    assert not live.exists() and (out / "weights").read_text() == "third"

    # Killed between its two renames: NAME is in .NAME.old-*/x and NAME is missing. Put back, never lost:
    aside = tmp_path / ".model.old-killed"
    aside.mkdir()
    out.rename(aside / "x")
    with pytest.raises(UserError, match="exists and is not empty"):
        with atomic_folder(str(out)):
            pass
    assert (out / "weights").read_text() == "third" and not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
