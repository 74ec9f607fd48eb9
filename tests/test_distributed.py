"""train.py on several processes, for real: JAX's distributed runtime with Gloo CPU collectives on
127.0.0.1, every process a subprocess with 2 (or 4) fake CPU devices and its own timeout, ports
chosen free by the test, the tiny BERT of tests/tiny_model.py.

- 2 processes x 2 devices train as 1 process x 4 devices: the same losses and weights, with a short
  last batch that leaves devices of process 1 with one pair or none; the evaluation at each epoch's
  end (encode on each process's own devices) gives every process the same result.
- Only process 0 writes metrics.jsonl, training.png, config.json and model/: process 1 runs in a folder
  of its own whose checkpoints/ is a link to process 0's, and nothing else appears there.
- Both processes killed after a checkpoint and started again with the same commands: the model of an
  uninterrupted run. The same checkpoint resumed by one process with 4 devices: the same model too
  (a run moves to another process count).
- A peer killed with SIGKILL, the coordinator (process 0) or the other one: the survivor ends within
  a bound with one `error:` line that names the lost process and says how to resume, exit 1.
- The supervisor's filter on the real endings of a run (fast, no processes).
- Usage errors, a coordinator that never answers, a coordinator port in use.

The compilation cache is shared by the module's runs, so most runs load their programs.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, SELF_MEASURED, assert_user_error, cpu_devices_env, write_subset
from tiny_model import write_tiny_model

TRAIN = REPO_ROOT / "train.py"
PAIRS = 21  # batches of 8: each epoch's last batch has 5 pairs (devices get 2, 2, 1 and 0)
STEPS, EVERY = 12, 4  # 4 epochs of 3 steps, a checkpoint every 4 steps
RUN_TIMEOUT = 400  # seconds, for any one process (about 15 s each on an idle 2-core machine)
HEARTBEAT = 5  # --heartbeat-timeout of the peer-death runs
LOSS_RTOL, LOSS_ATOL, PARAM_RTOL, PARAM_ATOL = 1e-6, 1e-7, 1e-5, 1e-7  # float32 summation orders differ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(model_path, data_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    tiny = write_tiny_model(model_path, str(base / "tiny"))
    data = write_subset(data_dir / "quora_train.tsv", base / "pairs.tsv", PAIRS)
    return {"base": base, "tiny": tiny, "data": data, "cache": base / "xla"}


def env_for(setup, devices: int) -> dict:
    env = cpu_devices_env(devices)
    env["MINILM_JAX_CACHE_DIR"] = str(setup["cache"])
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def train_args(setup, out: Path, *extra) -> list[str]:
    return ["--model", setup["tiny"], "--train-file", str(setup["data"]), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "8", "--no-dropout", "--log-every", "1",
            "--checkpoint-every", str(EVERY), "--keep-checkpoints", "5", "--no-progress", *map(str, extra)]


def process_args(port: int, i: int, n: int = 2, *extra) -> list[str]:
    return ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
            "--init-timeout", "60", *map(str, extra)]


class Runs:
    """Processes started together, each with its log files and a deadline; all killed at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, tuple[subprocess.Popen, float]] = {}

    def start(self, name: str, args: list, env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "w") as out, open(self.logs / f"{name}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, str(TRAIN), *map(str, args)], cwd=REPO_ROOT, env=env,
                                    stdout=out, stderr=err)
        self.procs[name] = (proc, time.monotonic() + RUN_TIMEOUT)
        return proc

    def wait(self, name: str) -> subprocess.CompletedProcess:
        proc, deadline = self.procs[name]
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"{name} ran longer than {RUN_TIMEOUT} s:\n{self.stderr(name)[-3000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, (self.logs / f"{name}.out").read_text(),
                                           self.stderr(name))

    def stderr(self, name: str) -> str:
        return (self.logs / f"{name}.err").read_text(errors="replace")

    def kill(self, *names: str) -> None:
        """SIGKILL, as a host that dies (a supervisor's training process goes with it)."""
        for name in names:
            self.procs[name][0].kill()
        for name in names:
            self.procs[name][0].wait()

    def close(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assert_ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (f"{' '.join(map(str, proc.args))}\nexit {proc.returncode}\nstdout:\n"
                                  f"{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_for(predicate, runs: Runs, names, what: str, timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for name in names:
            proc = runs.procs[name][0]
            assert proc.poll() is None, f"{name} ended (exit {proc.returncode}) before {what}:\n{runs.stderr(name)[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


def complete_checkpoint(out: Path, step: int):
    return lambda: (out / "checkpoints" / str(step) / "commit_success.txt").exists()


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    ta, tb = tensors(a / "model"), tensors(b / "model")
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if exact:
            assert np.array_equal(ta[name], tb[name]), f"{name}: {a} and {b} differ"
        else:
            np.testing.assert_allclose(ta[name], tb[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)


# ----------------------------------------------------------------------------- the reference runs

@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run on 2 processes x 2 devices and one on 1 process x 4 devices, side by side.
    Process 1 runs in its own folder, which holds only a link to process 0's checkpoints/."""
    base = setup["base"]
    two, two_p1, four = base / "two", base / "two-process1", base / "four"
    (two / "checkpoints").mkdir(parents=True)
    two_p1.mkdir()
    (two_p1 / "checkpoints").symlink_to(two / "checkpoints", target_is_directory=True)
    port = free_port()
    with Runs(base / "logs-reference") as runs:
        evaluation = ("--eval-file", setup["data"])  # encode on each process's devices, at each epoch's end
        runs.start("p0", train_args(setup, two, *evaluation) + process_args(port, 0), env_for(setup, 2))
        runs.start("p1", train_args(setup, two_p1, *evaluation) + process_args(port, 1), env_for(setup, 2))
        runs.start("four", train_args(setup, four, *evaluation), env_for(setup, 4))
        results = {name: runs.wait(name) for name in ("p0", "p1", "four")}
    return {"two": two, "two_p1": two_p1, "four": four, "stderr_p1": results["p1"].stderr,
            "result": {name: assert_ok(result) for name, result in results.items()}}


def test_two_processes_of_two_devices_train_as_one_process_of_four(setup, reference):
    two, four = reference["two"], reference["four"]
    rec2, rec4 = step_records(two), step_records(four)
    assert [r["step"] for r in rec2] == [r["step"] for r in rec4] == list(range(1, STEPS + 1))
    # An epoch is as many steps as the fullest of the 4 shards needs at 2 pairs a step: the 21 rows are cut
    # by bytes, so a shard holds 4 to 7 of them, and the others' last steps are short or empty.
    per_epoch = round(1 / rec2[0]["epoch"])
    assert per_epoch in (3, 4) and [r["epoch"] for r in rec2][:per_epoch] == [round((k + 1) / per_epoch, 4)
                                                                              for k in range(per_epoch)]
    for key in ("epoch", "learning_rate"):
        assert [r[key] for r in rec2] == [r[key] for r in rec4], key
    np.testing.assert_allclose([r["loss"] for r in rec2], [r["loss"] for r in rec4], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                               err_msg="losses per step, 2 processes x 2 devices vs 1 process x 4 devices")
    assert_same_weights(two, four)
    initial = tensors(Path(setup["tiny"]))
    moved = [k for k, v in tensors(two / "model").items() if not np.array_equal(v, initial[k])]
    assert len(moved) > len(initial) // 2, f"training changed only {moved}"
    # Each process reads only its own devices' share of the data: together what one process of 4 reads.
    read = {name: result["rows_read"] for name, result in reference["result"].items()}
    assert 0 < read["p0"] < read["p0"] + read["p1"] == read["four"], read
    # What each process measured about itself (compilation, steps, rows read) is not an evaluation.
    own = {"output_dir", "model", "general_steps", "steps", "rows_read", *SELF_MEASURED} - {"pairs_per_second"}
    assert all(own - {"output_dir", "model"} <= set(result) for result in reference["result"].values())  # an eval file
    metrics = {name: {k: v for k, v in result.items() if k not in own} for name, result in reference["result"].items()}
    assert set(metrics["p0"]) == {"pearson_cosine", "spearman_cosine"}
    assert metrics["p0"] == metrics["p1"]  # every process evaluates on its own devices, to the same result
    for key, value in metrics["p0"].items():
        assert value == pytest.approx(metrics["four"][key], rel=1e-6, abs=1e-6), key
    evals = [r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "eval_spearman_cosine" in r]
    assert [r["step"] for r in evals] == sorted({*range(per_epoch, STEPS + 1, per_epoch), STEPS})


def test_only_process_0_writes_the_logs_and_the_model(reference):
    two, two_p1 = reference["two"], reference["two_p1"]
    assert sorted(p.name for p in two_p1.iterdir()) == ["checkpoints"], "process 1 wrote into its output folder"
    assert (two_p1 / "checkpoints").is_symlink()
    for name in ("metrics.jsonl", "training.png", "config.json", "model/model.safetensors", "model/README.md"):
        assert (two / name).is_file(), name
    assert [r["step"] for r in step_records(two)] == list(range(1, STEPS + 1))  # each record once
    assert "Traceback" not in reference["stderr_p1"]


# ----------------------------------------------------------------------------- kills and resumes

def test_both_killed_after_a_checkpoint_resume_to_the_uninterrupted_model_on_2_or_1_processes(setup, reference):
    """The same two commands again give the uninterrupted run's model. A copy of the same folder resumed
    by one process with 4 devices gives it too (to float32 rounding): the checkpoint is complete and
    restorable by a single process."""
    base = setup["base"]
    out, moved = base / "killed", base / "killed-one-process"
    port = free_port()
    with Runs(base / "logs-killed") as runs:
        runs.start("p0", train_args(setup, out) + process_args(port, 0), env_for(setup, 2))
        runs.start("p1", train_args(setup, out) + process_args(port, 1), env_for(setup, 2))
        wait_for(complete_checkpoint(out, EVERY), runs, ["p0", "p1"], f"checkpoint {EVERY}")
        runs.kill("p0", "p1")
    assert not (out / "model").exists(), "the run finished before it was killed"
    shutil.copytree(out, moved, symlinks=True)
    port = free_port()
    with Runs(base / "logs-resumed") as runs:
        runs.start("p0", train_args(setup, out) + process_args(port, 0), env_for(setup, 2))
        runs.start("p1", train_args(setup, out) + process_args(port, 1), env_for(setup, 2))
        runs.start("one", train_args(setup, moved), env_for(setup, 4))
        results = {name: runs.wait(name) for name in ("p0", "p1", "one")}
    for result in results.values():
        assert_ok(result)
    steps = [r["step"] for r in step_records(out)]
    assert steps == list(range(1, STEPS + 1)), steps  # the resumed run kept the records up to its checkpoint
    assert_same_weights(out, reference["two"], exact=True)
    assert_same_weights(moved, reference["two"])


def test_two_datasets_on_two_processes_killed_and_resumed_give_the_uninterrupted_model(setup, data_dir):
    """Two datasets of their own losses on 2 processes x 2 devices, each process reading its devices'
    share: killed after a checkpoint and resumed, the uninterrupted run's model, bit for bit."""
    base = setup["base"]
    stsb = write_subset(data_dir / "stsb_train.tsv", base / "stsb.tsv", 30)
    config = base / "two-datasets.json"
    config.write_text(json.dumps([
        {"name": "quora", "files": str(setup["data"]), "loss": "MultipleNegativesRankingLoss"},
        {"name": "stsb", "files": str(stsb), "loss": "CoSENTLoss", "score_scale": 5}]))

    def args(out: Path) -> list[str]:
        plain = train_args(setup, out, "--multi-dataset-sampler", "round-robin")
        i = plain.index("--train-file")
        return plain[:i] + ["--data-config", str(config)] + plain[i + 2:]

    def on_two_processes(out: Path, logs: str, until=None) -> None:
        """Both processes to the end, or (until: a predicate) killed once it holds."""
        port = free_port()
        with Runs(base / logs) as runs:
            for i in range(2):
                runs.start(f"p{i}", args(out) + process_args(port, i), env_for(setup, 2))
            if until is None:
                for name in ("p0", "p1"):
                    assert_ok(runs.wait(name))
            else:
                wait_for(until, runs, ["p0", "p1"], f"checkpoint {EVERY}")
                runs.kill("p0", "p1")

    straight, killed = base / "two-datasets", base / "two-datasets-killed"
    on_two_processes(straight, "logs-two-datasets")
    on_two_processes(killed, "logs-two-datasets-killed", until=complete_checkpoint(killed, EVERY))
    assert not (killed / "model").exists(), "the run finished before it was killed"
    on_two_processes(killed, "logs-two-datasets-resumed")
    assert [r["step"] for r in step_records(killed)] == list(range(1, STEPS + 1))
    assert_same_weights(killed, straight, exact=True)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_peer_ends_the_other_process_with_one_error_line(setup, victim):
    """SIGKILL one process after a checkpoint. The survivor learns it from a broken Gloo connection in
    its next collective, or from the coordination service after --heartbeat-timeout (at once when the
    coordinator itself is gone). Either way: one line naming the lost process, exit 1, within the bound."""
    base = setup["base"]
    out = base / f"peer-{victim}"
    port = free_port()
    extra = ("--max-steps", 10_000, "--checkpoint-every", EVERY)  # still training when the kill comes
    with Runs(base / f"logs-peer-{victim}") as runs:
        for i in (0, 1):
            runs.start(f"p{i}", train_args(setup, out, *extra) + process_args(port, i, 2, "--heartbeat-timeout",
                                                                             HEARTBEAT), env_for(setup, 2))
        wait_for(complete_checkpoint(out, EVERY), runs, ["p0", "p1"], f"checkpoint {EVERY}")
        killed_at = time.monotonic()
        runs.kill(f"p{victim}")
        survivor = runs.wait(f"p{1 - victim}")
        seconds = time.monotonic() - killed_at
    line = assert_user_error(survivor, 1, f"lost process {victim} of 2", "Run the same command on every host again")
    assert seconds < HEARTBEAT + 20, f"the survivor took {seconds:.1f} s to stop: {line}"
    assert "Check failure stack trace" not in survivor.stderr and "Traceback" not in survivor.stderr
    assert (out / "checkpoints" / str(EVERY) / "commit_success.txt").exists()


# ----------------------------------------------------------------------------- the supervisor's filter

# The ends of two real runs (jax 0.10.2, stderr of the survivor, cut after the first stack frames):
# process 1 killed, and process 0 (the coordinator) killed.
HEARTBEAT_FATAL = """\
E1130 10:35:52.974471    5786 coordination_service.cc:1549] [2388524535928930368] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1130 10:35:52.986441    5797 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1130 10:35:52.987874    5797 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
    @     0x7f2878040634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7f28780405b6  absl::lts_20260107::log_internal::LogMessage::Flush()
    @     0x7f287809a82e  std::_Function_handler<>::_M_invoke()
    @     0x7f28740eb505  std::_Function_handler<>::_M_invoke()
"""
COORDINATOR_FATAL = """\
E1130 10:36:09.643827    6623 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1130 10:36:09.643858    6623 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}
*** Check failure stack trace: ***
    @     0x7fcf5c240634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7fcf5c2405b6  absl::lts_20260107::log_internal::LogMessage::Flush()
    @     0x7fcf5c29a82e  std::_Function_handler<>::_M_invoke()
"""


def test_the_supervisor_passes_output_through_and_replaces_only_the_runtime_abort():
    """What a supervised process writes reaches the terminal unchanged (a runtime log line that no
    abort follows comes out after a short hold); the coordination service's abort becomes one line."""
    import io

    from minilm_jax import distributed

    options = distributed.Options("127.0.0.1:1234", 2, 0, heartbeat_timeout=5)
    out = io.BytesIO()
    f = distributed._StderrFilter(out)
    progress = b"train:  50%|#####     | 6/12 [00:01<00:01]\r"
    warning = b"W1130 10:35:52.974471    5786 coordination_service.cc:1549] a warning, no abort after it\n"
    f.feed(b"a line of our own\n" + progress)
    assert out.getvalue() == b"a line of our own\n" + progress
    f.feed(warning)
    assert f.timeout() is not None and out.getvalue().endswith(progress)  # held, in case an abort follows
    f.hold_until = 0.0
    f.tick()
    assert out.getvalue().endswith(warning) and f.timeout() is None
    assert f.close() is None

    for text, me, needle in ((HEARTBEAT_FATAL, 0, "lost process 1 of 2: the coordinator heard nothing from it for 5 s"),
                             (COORDINATOR_FATAL, 1, "lost process 0 of 2, the coordinator at 127.0.0.1:1234")):
        out = io.BytesIO()
        f = distributed._StderrFilter(out)
        for k in range(0, len(text), 97):  # in pieces, as a pipe delivers it
            f.feed(text[k:k + 97].encode())
        fatal = f.close()
        assert out.getvalue() == b"" and fatal is not None
        who = {"process_id": me, "num_processes": 2, "coordinator_address": "127.0.0.1:1234"}
        line = distributed.explain_fatal(fatal, options, who)
        assert needle in line and line.endswith(distributed.RESUME) and "\n" not in line, line


# ----------------------------------------------------------------------------- bad launches

def test_usage_errors_before_anything_starts(setup, tmp_path):
    base = train_args(setup, tmp_path / "out")
    cases = {
        "two of three": (["--num-processes", "2", "--process-id", "0"], "needs --coordinator-address too"),
        "no port": (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"],
                    "is not HOST:PORT"),
        "id out of range": (process_args(1234, 2), "--process-id must be between 0 and"),
        "timeout alone": (["--heartbeat-timeout", "5"], "applies to runs on several processes only"),
        "zero timeout": (process_args(1234, 0, 2, "--init-timeout", "0"), "--init-timeout must be at least 1"),
    }
    env = env_for(setup, 1)
    procs = {name: subprocess.Popen([sys.executable, str(TRAIN), *map(str, base), *args], cwd=REPO_ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
        assert_user_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 2, cases[name][1])
    assert not (tmp_path / "out").exists()


def test_distributed_without_a_cluster_is_a_usage_error(setup, tmp_path):
    env = {k: v for k, v in env_for(setup, 1).items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "TPU_"))}
    proc = subprocess.run([sys.executable, str(TRAIN), *map(str, train_args(setup, tmp_path / "out")), "--distributed"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert_user_error(proc, 2, "--distributed found no cluster", "--coordinator-address HOST:PORT")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_coordinator_ends_with_one_error_line_after_the_init_timeout(setup, tmp_path):
    port = free_port()  # nothing listens there
    args = [*train_args(setup, tmp_path / "out"), "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", "1", "--init-timeout", "1"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(TRAIN), *map(str, args)], cwd=REPO_ROOT, env=env_for(setup, 1),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    seconds = time.monotonic() - start
    assert_user_error(proc, 1, f"could not reach the coordinator at 127.0.0.1:{port}", "--init-timeout")
    assert "Check failure stack trace" not in proc.stderr
    assert seconds < 60, f"{seconds:.1f} s"  # 1 s of timeout, ~6 s of jax's retries, and two start-ups
    assert not (tmp_path / "out").exists()


def test_a_coordinator_port_in_use_is_named(setup, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [*train_args(setup, tmp_path / "out"), *process_args(port, 0)]
        proc = subprocess.run([sys.executable, str(TRAIN), *map(str, args)], cwd=REPO_ROOT, env=env_for(setup, 1),
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert_user_error(proc, 1, f"process 0 could not start the coordinator on 127.0.0.1:{port}", "choose another port")
    assert not (tmp_path / "out").exists()


def test_process_0_tries_the_coordinator_port_before_jax():
    # gRPC sometimes crashes (SIGSEGV) on a taken port instead of raising, so the port is tried first.
    from minilm_jax import distributed
    from minilm_jax.errors import UserError

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"could not start the coordinator on 127.0.0.1:{port}"):
            distributed._check_coordinator_port(f"127.0.0.1:{port}")
    distributed._check_coordinator_port(f"127.0.0.1:{free_port()}")  # a free port passes
