"""Stop signals and write failures, with real processes: train.py stopped by SIGTERM, SIGINT or SIGUSR1 at
random steps, during an evaluation and during the export, on 1 process and on 2 (jax's distributed runtime,
Gloo on 127.0.0.1), always resumes to the uninterrupted run's model, bit for bit; a full disk (a real
size-limited tmpfs) during a checkpoint, the export and the small files ends with one error line and
loses nothing; the output folder's lock refuses a second run, on several processes too, and is taken
over after a kill -9.

What a stop must show (preemption.py): exit status 75, one `stopped:` line that names the step and how
to resume, a complete checkpoint of the step in flight (the last step in metrics.jsonl), nothing
half-written.

A tiny BERT (tests/tiny_model.py) and 48 real STS-B pairs, batch 4: 12 steps an epoch. The XLA
compilation cache is shared by the module's runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SELF_MEASURED, assert_user_error, cpu_devices_env, write_subset
from test_crash import assert_same_model, at_step, exporting, leftovers, snapshot
from test_distributed import free_port
from tiny_model import write_tiny_model

TRAIN = REPO_ROOT / "train.py"
STEPS, EPOCH = 120, 12
STOPPED, INTERRUPTED = 75, 130
TIMEOUT = 300  # seconds, for any one run


@pytest.fixture(scope="module")
def setup(model_path, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("preemption")
    tiny = write_tiny_model(model_path, str(base / "tiny"))
    data = write_subset(data_dir / "stsb_train.tsv", base / "pairs.tsv", 48)
    evaluation = write_subset(data_dir / "stsb_dev.tsv", base / "dev.tsv", 300)  # an evaluation long enough to hit
    return {"base": base, "tiny": tiny, "data": data, "eval": evaluation, "cache": base / "xla"}


def train_args(setup, out: Path, *extra) -> list[str]:
    return ["--model", setup["tiny"], "--train-file", str(setup["data"]), "--score-scale", "5", "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "4",
            "--checkpoint-every", "1000", "--keep-checkpoints", "2", "--log-every", "1", "--no-progress",
            "--seed", "7", *map(str, extra)]


def env_for(setup, devices: int = 1) -> dict:
    env = cpu_devices_env(devices)
    env["MINILM_JAX_CACHE_DIR"] = str(setup["cache"])
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


class Run:
    """train.py in a subprocess, its output in files."""

    def __init__(self, setup, args: list, log: Path, devices: int = 1):
        self.log = log
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO_ROOT, env=env_for(setup, devices),
                                         stdout=out, stderr=err)
        self.start = time.monotonic()
        self.deadline = self.start + TIMEOUT

    def signal_when(self, trigger, *signums, pause: float = 0.05) -> None:
        """Send the signals (`pause` s apart) once trigger(seconds since the start) is true (the triggers of
        test_crash.py); the run must still be going."""
        while not trigger(time.monotonic() - self.start):
            assert self.proc.poll() is None, f"the run ended (exit {self.proc.returncode}) first:\n{self.stderr()[-3000:]}"
            assert time.monotonic() < self.deadline, "the moment to signal never came"
            time.sleep(0.002)
        for i, signum in enumerate(signums):
            if i:
                time.sleep(pause)
            self.proc.send_signal(signum)

    def wait(self) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, Path(f"{self.log}.out").read_text(),
                                           self.stderr())

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text(errors="replace")


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (Linux: the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    m = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M)
    return bool(m and int(m.group(1), 16) >> (signum - 1) & 1)


def complete_checkpoints(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def step_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def assert_stopped(result: subprocess.CompletedProcess, out: Path, cause: str, hosts: bool = False) -> int:
    """Exit 75, one `stopped:` line naming the step, a complete checkpoint of it, which is the last step
    logged; the step."""
    assert result.returncode == STOPPED, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    m = re.fullmatch(rf"stopped: {cause} at step (\d+) of {STEPS}: the checkpoint of step (\d+) is in "
                     rf"{re.escape(str(out / 'checkpoints'))} \(complete [\d.]+ s after the stop\); run the same "
                     rf"command {'on every host ' if hosts else ''}again to resume from step (\d+)", lines[0])
    assert m and len(set(m.groups())) == 1, lines[0]
    step = int(m.group(1))
    assert complete_checkpoints(out)[-1] == step
    assert step_records(out)[-1]["step"] == step  # the step in flight, finished
    assert not leftovers(out), leftovers(out)
    return step


def assert_resumed_like(out: Path, reference: Path) -> None:
    assert_same_model(out / "model", reference / "model")
    mine, theirs = step_records(out), step_records(reference)
    assert [r["step"] for r in mine] == list(range(1, STEPS + 1))
    drop = SELF_MEASURED | {"grad_norm"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in mine] == \
           [{k: v for k, v in r.items() if k not in drop} for r in theirs]
    assert not leftovers(out), leftovers(out)


def evaluating(out: Path):
    """While an epoch's evaluation runs: this run's metrics.jsonl (a resumed run rewrites it: a new inode)
    ends with the epoch's last step, and no evaluation of it yet."""
    path = out / "metrics.jsonl"
    initial = path.stat().st_ino if path.exists() else None

    def trigger(_elapsed) -> bool:
        try:
            if path.stat().st_ino == initial:
                return False
            records = [json.loads(line) for line in path.read_text().splitlines()[-2:] if line.endswith("}")]
        except (FileNotFoundError, ValueError):
            return False
        last = records[-1] if records else {}
        return "loss" in last and last["step"] % EPOCH == 0

    return trigger


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["base"] / "reference"
    result = Run(setup, train_args(setup, out), setup["base"] / "reference").wait()
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_stop_signals_at_random_steps_save_the_step_in_flight_and_resume_bit_identical(setup, reference):
    base = setup["base"]
    out = base / "stopped"
    rng = random.Random(20261205)
    later = lambda: at_step(max([0, *[r["step"] for r in step_records(out)]]) + rng.randint(3, 15))(out)  # noqa: E731

    # Before training begins, nothing is lost: it ends at once, before writing anything.
    run = Run(setup, train_args(setup, out), base / "sigterm-starting")
    run.signal_when(lambda elapsed: catches(run.proc.pid, signal.SIGTERM), signal.SIGTERM)
    result = run.wait()
    said = [line for line in result.stderr.splitlines() if line.startswith("stopped: ")]
    assert result.returncode == STOPPED and len(said) == 1 and said[0].startswith(
        "stopped: received SIGTERM before training began, nothing to save"), result.stderr[-3000:]
    assert not out.exists()

    first = rng.randint(3, 20)
    run = Run(setup, train_args(setup, out), base / "sigterm")
    run.signal_when(at_step(first)(out), signal.SIGTERM)
    step = assert_stopped(run.wait(), out, "received SIGTERM")
    assert step >= first

    run = Run(setup, train_args(setup, out), base / "sigint")
    run.signal_when(later(), signal.SIGINT)
    step = assert_stopped(run.wait(), out, "received SIGINT")

    # Ctrl-C twice: stops at once, exit 130; a checkpoint the first one began may be left unfinished, and the
    # last complete one stands (the next run removes the rest).
    run = Run(setup, train_args(setup, out), base / "sigint-twice")
    run.signal_when(later(), signal.SIGINT, signal.SIGINT, pause=0.01)
    assert_user_error(run.wait(), INTERRUPTED, "interrupted (a second Ctrl-C): stopped at once",
                      "run the same command again")
    assert complete_checkpoints(out)[-1] >= step

    # kill -9: the lock it held is taken over by the next run (flock: the kernel drops it with the process).
    run = Run(setup, train_args(setup, out), base / "kill-9")
    run.signal_when(later(), signal.SIGKILL)
    assert run.wait().returncode == -signal.SIGKILL
    assert (out / ".lock").read_text() == f"pid {run.proc.pid}"

    # The evaluation settings may change between runs; an evaluation at each epoch's end from here on.
    run = Run(setup, train_args(setup, out, "--eval-file", setup["eval"]), base / "sigusr1-evaluating")
    run.signal_when(evaluating(out), signal.SIGUSR1)
    step = assert_stopped(run.wait(), out, "received SIGUSR1")
    assert step % EPOCH == 0, "the signal came during the evaluation of an epoch's end"
    evaluations = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_spearman_cosine" in r]
    assert evaluations[-1]["step"] == step  # the evaluation finished, then the run stopped

    # During the export the run is seconds from its end: it finishes (exit 0) with a complete model.
    run = Run(setup, train_args(setup, out), base / "sigterm-exporting")
    run.signal_when(exporting(0.0)(out), signal.SIGTERM)
    result = run.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like(out, reference)


@pytest.mark.slow
def test_on_two_processes_a_signal_to_either_stops_both_at_the_same_step(setup):
    """2 processes x 1 device. SIGTERM to process 1 at a random step, then SIGINT to process 0 of the resumed
    run: both stop at the same step with exit 75, and the run resumed once more equals an uninterrupted
    2-process run bit for bit. A pair started on a folder whose lock another train.py holds is refused,
    each process with the same line."""
    base = setup["base"]
    rng = random.Random(11)

    def pair(out: Path, name: str) -> list[Run]:
        port = free_port()
        return [Run(setup, train_args(setup, out, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", 2,
                                      "--process-id", i, "--init-timeout", 120), base / f"{name}-p{i}") for i in (0, 1)]

    reference, out, busy = base / "two-reference", base / "two-stopped", base / "two-busy"
    straight = pair(reference, "two-reference")
    stopped = pair(out, "two-sigterm")
    stopped[1].signal_when(at_step(rng.randint(3, 30))(out), signal.SIGTERM)
    results = [run.wait() for run in stopped]
    steps = {assert_stopped(results[0], out, "process 1 received SIGTERM", hosts=True),
             assert_stopped(results[1], out, "received SIGTERM", hosts=True)}
    assert len(steps) == 1, steps

    resumed = pair(out, "two-sigint")
    resumed[0].signal_when(at_step(steps.pop() + rng.randint(3, 20))(out), signal.SIGINT)
    results = [run.wait() for run in resumed]
    steps = {assert_stopped(results[0], out, "received SIGINT", hosts=True),
             assert_stopped(results[1], out, "process 0 received SIGINT", hosts=True)}
    assert len(steps) == 1, steps

    final = pair(out, "two-final")
    busy.mkdir()
    with open(busy / ".lock", "a+") as lock:  # as another train.py holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242")
        lock.flush()
        for run in pair(busy, "two-refused"):
            assert_user_error(run.wait(), 1, f"{busy} is in use by another train.py (pid 4242)",
                              "choose another --output-dir")
    for run in final + straight:
        result = run.wait()
        assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like(out, reference)


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MB tmpfs (root only); its writes past the size fail with ENOSPC."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk with a file, leaving about `leave` bytes free."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def free_bytes(disk: Path) -> int:
    stat = os.statvfs(disk)
    return stat.f_bavail * stat.f_frsize


def test_a_full_disk_loses_nothing_and_the_same_command_resumes(setup, reference, small_disk):
    base, out = setup["base"], small_disk / "run"
    args = train_args(setup, out, "--checkpoint-every", 48)  # the checkpoint interval does not change the result
    checkpoint = sum(p.stat().st_size for p in (reference / "checkpoints").rglob("*") if p.is_file())

    # A checkpoint: room for one, not two. Orbax's half-written folder is removed; the first one stands.
    filler = fill(small_disk, int(1.5 * checkpoint))
    result = Run(setup, args, base / "full-checkpoint").wait()
    assert_user_error(result, 1, "could not write the checkpoint of step 96: No space left on device",
                      "the checkpoint of step 48 stands", f"({out / 'checkpoints' / '96'})")
    assert complete_checkpoints(out) == [48] and not leftovers(out), os.listdir(out / "checkpoints")
    filler.unlink()
    result = Run(setup, args, base / "full-checkpoint-resumed").wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_like(out, reference)

    # The export of a finished run, run again: the earlier model stays as it was.
    model = snapshot(out / "model")
    filler = fill(small_disk, 1 << 20)
    result = Run(setup, args, base / "full-export").wait()
    assert_user_error(result, 1, "No space left on device", f"({out / 'model'})")
    assert snapshot(out / "model") == model and not leftovers(out)
    filler.unlink()
    result = Run(setup, args, base / "full-export-again").wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(out / "model") == model  # the same bytes, written again

    # The small files: nothing free at all. The run's first write fails, naming its file; nothing changes.
    files = {name: (out / name).read_bytes() for name in ("config.json", "metrics.jsonl", "training.png")}
    filler = fill(small_disk, 0)
    result = Run(setup, args, base / "full-small-files").wait()
    assert_user_error(result, 1, "could not write config.json (the previous one is kept): No space left on device",
                      f"({out / 'config.json'})")
    from minilm_jax.plot import plot_training
    from minilm_jax.run_folder import write_text_atomic

    with pytest.raises(OSError) as raised:
        write_text_atomic(out / "metrics.jsonl", "x" * 100_000)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out / "metrics.jsonl")
    with pytest.raises(OSError) as raised:
        plot_training(step_records(out), str(out / "training.png"))
    assert raised.value.errno == errno.ENOSPC
    assert {name: (out / name).read_bytes() for name in files} == files and not leftovers(out)
    assert free_bytes(small_disk) < 4096
