"""Resuming: a run killed with SIGKILL and started again with the same command ends with the same
bits as a run that was never interrupted (dropout on, so the dropout rng, a function of the step,
is tested too), and its metrics.jsonl has every step exactly once. Restarting a finished run
changes nothing; restarting with another setting, or while another train.py holds the folder,
is refused with a clear error.

Tiny random model (real tokenizer), 1 device, subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, SELF_MEASURED, assert_user_error, write_subset
from tiny_model import write_tiny_model

N_STEPS = 40
CHECKPOINT_EVERY = 5
KILL_AFTER_CHECKPOINT = 10  # kill once a finished checkpoint of this step or later exists
N_PAIRS = 48  # 3 batches of 16 per epoch: the 40 steps span 14 epochs, each with its own shuffle


def train_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def train_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "train.py"), *map(str, args)]


def start(args: list, log: Path) -> subprocess.Popen:
    """Start train.py with output to files (never a pipe a killed or waiting process could block on)."""
    return subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, env=train_env(), stdout=open(f"{log}.out", "w"),
                            stderr=open(f"{log}.err", "w"), text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, Path(f"{log}.out").read_text(),
                                       Path(f"{log}.err").read_text())


def run(args: list, log: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return finish(start(args, log), log, timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"


def finished_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoints that are complete (orbax writes into a temporary name, then renames)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def tensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def without_speed(recs: list[dict]) -> list[dict]:
    """What a process measured about itself (speed, compilation) left out."""
    return [{k: v for k, v in r.items() if k not in SELF_MEASURED} for r in recs]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, model_path, data_dir):
    root = tmp_path_factory.mktemp("resume")
    tiny = write_tiny_model(model_path, str(root / "tiny"))
    train = write_subset(data_dir / "quora_train.tsv", root / "train.tsv", N_PAIRS)

    def args(out: Path, *extra) -> list:
        return ["--model", tiny, "--train-file", train, "--output-dir", out, "--max-steps", N_STEPS,
                "--batch-size", 16, "--checkpoint-every", CHECKPOINT_EVERY, "--log-every", 1, "--no-progress", *extra]

    return root, args


@pytest.fixture(scope="module")
def runs(tiny_setup):
    """An uninterrupted run, and one killed after its step-10+ checkpoint and restarted, side by side."""
    root, args = tiny_setup
    straight, resumed = root / "straight", root / "resumed"
    p_straight = start(args(straight), root / "straight-log")
    p_killed = start(args(resumed), root / "killed-log")
    deadline = time.monotonic() + 300
    try:
        while not [s for s in finished_checkpoints(resumed / "checkpoints") if s >= KILL_AFTER_CHECKPOINT]:
            assert p_killed.poll() is None, f"the run to kill ended first:\n{Path(f'{root}/killed-log.err').read_text()}"
            assert time.monotonic() < deadline, "no checkpoint of step 10 or later within 300 s"
            time.sleep(0.02)
        os.kill(p_killed.pid, signal.SIGKILL)
    finally:
        killed = finish(p_killed, root / "killed-log")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed (exit {killed.returncode}): it finished first"
    killed_at = finished_checkpoints(resumed / "checkpoints")
    assert killed_at and max(killed_at) < N_STEPS, killed_at
    assert not (resumed / "model").exists(), "the killed run got as far as exporting"

    restarted = run(args(resumed), root / "restarted-log")
    assert_ok(restarted)
    assert_ok(finish(p_straight, root / "straight-log"))
    return straight, resumed, max(killed_at)


def test_killed_and_resumed_run_is_bit_identical(runs):
    straight, resumed, killed_at = runs
    a, b = tensors(straight), tensors(resumed)
    assert sorted(a) == sorted(b)
    different = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not different, f"resumed (killed after the step-{killed_at} checkpoint) differs in {different}"


def test_resumed_metrics_have_each_step_once(runs):
    straight, resumed, killed_at = runs
    recs = records(resumed)
    assert [r["step"] for r in recs] == list(range(1, N_STEPS + 1)), f"killed after step-{killed_at} checkpoint"
    # And the same values as the uninterrupted run: the same losses, so the same batches and dropout masks.
    assert without_speed(recs) == without_speed(records(straight))
    assert len({r["loss"] for r in recs}) > N_STEPS // 2


def test_restarting_a_finished_run_changes_nothing(runs, tiny_setup, tmp_path):
    root, args = tiny_setup
    straight, _, _ = runs
    again = tmp_path / "again"
    shutil.copytree(straight, again)
    before_metrics = (again / "metrics.jsonl").read_bytes()
    before_weights = (again / "model" / "model.safetensors").read_bytes()
    before_checkpoints = finished_checkpoints(again / "checkpoints")
    shutil.rmtree(again / "model")  # so we see that it is written again

    proc = run(args(again), tmp_path / "log")
    assert_ok(proc)
    assert (again / "model" / "model.safetensors").read_bytes() == before_weights
    assert (again / "metrics.jsonl").read_bytes() == before_metrics
    assert finished_checkpoints(again / "checkpoints") == before_checkpoints
    assert (again / "model" / "README.md").exists()


def test_resuming_with_another_learning_rate_is_refused(runs, tiny_setup, tmp_path):
    root, args = tiny_setup
    straight, _, _ = runs
    folder = tmp_path / "changed"
    shutil.copytree(straight, folder)
    config_before = (folder / "config.json").read_text()
    proc = run(args(folder, "--learning-rate", "1e-4"), tmp_path / "log")
    assert_user_error(proc, 2, "learning_rate", "5e-05", "0.0001")
    assert (folder / "config.json").read_text() == config_before


def test_output_dir_in_use_is_refused(tiny_setup, tmp_path):
    root, args = tiny_setup
    folder = tmp_path / "busy"
    folder.mkdir()
    with open(folder / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 12345")
        lock.flush()
        proc = run(args(folder), tmp_path / "log")
    line = assert_user_error(proc, 1, "in use")
    assert str(folder) in line and "pid 12345" in line
    assert not (folder / "checkpoints").exists() and not (folder / "config.json").exists()


def test_checkpoint_of_another_layout_is_refused(runs, tiny_setup, tmp_path):
    """A checkpoint whose optimizer state has another layout (here the one minilm-jax 0.1 wrote:
    optax.chain(clip_by_global_norm, adamw) over every parameter) stops the run with one clear
    error, and stays on disk."""
    import jax
    import optax
    import orbax.checkpoint as ocp

    root, args = tiny_setup
    straight, _, _ = runs
    folder = tmp_path / "old-layout"
    shutil.copytree(straight, folder)
    shutil.rmtree(folder / "model")
    step = N_STEPS - CHECKPOINT_EVERY
    saved = ocp.CheckpointManager((folder / "checkpoints").absolute())
    restored = saved.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           input=ocp.args.JsonRestore()))
    params, input_state = restored["state"]["params"], restored["input"]
    saved.close()
    old_optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-5, weight_decay=0.0))
    old_state = jax.tree.map(np.asarray, {"step": np.int32(step), "params": params,
                                          "opt_state": old_optimizer.init(params)})

    def write(*, with_input: bool) -> None:
        shutil.rmtree(folder / "checkpoints")
        with ocp.CheckpointManager((folder / "checkpoints").absolute()) as manager:
            if with_input:
                manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(old_state),
                                                           input=ocp.args.JsonSave(input_state)))
            else:  # as minilm-jax wrote it before its input streamed: the state alone
                manager.save(step, args=ocp.args.StandardSave(old_state))
            manager.wait_until_finished()

    write(with_input=True)
    proc = run(args(folder), tmp_path / "log")
    line = assert_user_error(proc, 1, f"checkpoint {step}", "does not hold this version's training state",
                             "new --output-dir")
    assert str(folder) in line
    assert finished_checkpoints(folder / "checkpoints") == [step]
    assert not (folder / "model").exists()

    write(with_input=False)
    proc = run(args(folder), tmp_path / "log2")
    line = assert_user_error(proc, 1, f"checkpoint {step}", "holds no input position", "new --output-dir")
    assert finished_checkpoints(folder / "checkpoints") == [step]
