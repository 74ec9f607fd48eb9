"""Data parallelism does not change the result: train.py on 8 fake CPU devices gives the same
weights and losses as on 1 device, both reading the data as 8 shards (--data-shards 8: the batch
order depends on the shards, not on the devices; dropout off, so both compute the same function;
only float summation order differs), also when a shard's epoch ends and some devices get fewer
pairs or none at all.

Each run is a subprocess: the fake device count must be in XLA_FLAGS before jax is imported, and
the collective timeouts turn a cross-device deadlock into an abort after ~5 s instead of a hang.
The runs of one comparison go in parallel to save wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_user_error, cpu_devices_env, write_subset
from tiny_model import write_tiny_model

PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6
LOSS_RTOL = 1e-5


def run_train_parallel(runs: list[tuple[int, list]], logs: Path, timeout: int = 400) -> list[subprocess.CompletedProcess]:
    """Start `python train.py ARGS` for every (devices, args) at once; wait for all. Output goes to
    files (not pipes) so that no process blocks on a full pipe while another is waited for."""
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    for k, (devices, args) in enumerate(runs):
        out, err = open(logs / f"{k}.out", "w+"), open(logs / f"{k}.err", "w+")
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), *map(str, args)]
        started.append((cmd, subprocess.Popen(cmd, cwd=REPO_ROOT, env=cpu_devices_env(devices, collective_timeouts=True), stdout=out, stderr=err,
                                              text=True), out, err))
    results = []
    try:
        for cmd, proc, out, err in started:
            proc.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))
    finally:
        for _, proc, out, err in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
    return results


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"{' '.join(proc.args)}\nexit {proc.returncode} (134 = SIGABRT, e.g. a collective "
                                  f"timeout)\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}")


def load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def step_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def assert_same_training(one: Path, eight: Path, n_steps: int, tiny: Path) -> None:
    rec1, rec8 = step_records(one), step_records(eight)
    assert [r["step"] for r in rec1] == list(range(1, n_steps + 1))
    assert [r["step"] for r in rec8] == [r["step"] for r in rec1]
    for key in ("epoch", "learning_rate"):
        assert [r[key] for r in rec8] == [r[key] for r in rec1], key
    loss1, loss8 = np.array([r["loss"] for r in rec1]), np.array([r["loss"] for r in rec8])
    np.testing.assert_allclose(loss8, loss1, rtol=LOSS_RTOL, err_msg="losses per step, 8 devices vs 1")
    np.testing.assert_allclose([r["grad_norm"] for r in rec8], [r["grad_norm"] for r in rec1], rtol=1e-4)

    w1, w8 = load_tensors(one / "model"), load_tensors(eight / "model")
    assert sorted(w1) == sorted(w8)
    for name in w1:
        np.testing.assert_allclose(w8[name], w1[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)
    initial = load_tensors(tiny)
    moved = [name for name in w1 if not np.array_equal(w1[name], initial[name])]
    assert len(moved) > len(w1) // 2, f"training changed only {moved}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    return Path(write_tiny_model(model_path, str(folder / "model")))


def common_args(tiny: Path, train_file: Path, out: Path, max_steps: int) -> list:
    return ["--model", tiny, "--train-file", train_file, "--output-dir", out, "--max-steps", max_steps,
            "--batch-size", 16, "--data-shards", 8, "--no-dropout", "--log-every", 1, "--checkpoint-every", 1000,
            "--no-progress"]


def test_8_devices_match_1_device(tiny, data_dir, tmp_path):
    """20 steps, 5 epochs of 4 batches; each epoch's last batch has 15 pairs, so the 8th device
    gets 1 pair instead of 2 there (the case with devices left empty is the next test)."""
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 63)
    one, eight = tmp_path / "one", tmp_path / "eight"
    p1, p8 = run_train_parallel([(1, common_args(tiny, train, one, 20)), (8, common_args(tiny, train, eight, 20))],
                                tmp_path / "logs")
    assert_ok(p1)
    assert_ok(p8)
    assert json.loads(p8.stdout.strip().splitlines()[-1])["model"].endswith("model")
    assert_same_training(one, eight, 20, tiny)


def test_short_last_batch_8_devices_match_1_device(tiny, data_dir, tmp_path):
    """Batches of 16 pairs on 8 devices are 2 pairs per device. With 21 pairs, each epoch's last
    batch has 5: devices 0-1 get two pairs, device 2 one, devices 3-7 none. The loss is still the
    mean over the batch's real pairs, as on 1 device."""
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 21)
    n_steps = 6  # 3 epochs of 2 steps: every epoch ends with the short batch
    one, eight = tmp_path / "one", tmp_path / "eight"
    p1, p8 = run_train_parallel([(1, common_args(tiny, train, one, n_steps)),
                                 (8, common_args(tiny, train, eight, n_steps))], tmp_path / "logs")
    assert_ok(p1)
    assert_ok(p8)
    assert [r["epoch"] for r in step_records(one)] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert_same_training(one, eight, n_steps, tiny)


def test_batch_size_not_a_multiple_of_devices_is_a_usage_error(tiny, data_dir, tmp_path):
    train = write_subset(data_dir / "quora_train.tsv", tmp_path / "train.tsv", 32)
    args = common_args(tiny, train, tmp_path / "out", 4)
    args[args.index("--batch-size") + 1] = 12
    (proc,) = run_train_parallel([(8, args)], tmp_path / "logs")
    line = assert_user_error(proc, 2, "--batch-size 12", "8 devices")
    assert "multiple" in line
    assert not (tmp_path / "out" / "model").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()
