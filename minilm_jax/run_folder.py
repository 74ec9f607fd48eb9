"""A training run's folder: the lock that keeps a second train.py out, atomic writes, the checks that
an --output-dir holds this run (or none), metrics.jsonl, and the orbax checkpoints of the train state.

Bookkeeping only: nothing here knows the model or the train step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from minilm_jax.errors import UsageError, UserError

if TYPE_CHECKING:
    from minilm_jax.train_config import TrainConfig


class OutputLock:
    """An exclusive lock on the output folder, so two runs never write the same checkpoints.
    The OS drops it when the process dies, also on kill -9."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{folder} is in use by another train.py ({holder}); wait for it to finish "
                            "or choose another --output-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(e, path, f"{path.name} (the previous one is kept)") from None


def write_failed(e: OSError, path: Path, what: str) -> OSError:
    """`e` (a full disk, a read-only folder) as an OSError that says what could not be written and names
    `path`, which errors.cli_main prints: "error: could not write WHAT: No space left on device (PATH); ..."."""
    return OSError(e.errno, f"could not write {what}: {e.strerror or e}", str(path))


def check_output_dir(folder: Path) -> None:
    """Refuse, before anything is written, an --output-dir that is a file or a non-empty folder that
    holds no train.py run (a model folder, someone's notes): resuming is for runs only."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker == folder:
        raise UserError(f"--output-dir {folder} is a file; choose a folder path")
    if blocker is not None:
        raise UserError(f"--output-dir {folder}: {blocker} is a file, not a folder; choose another path")
    if not folder.is_dir() or not {p.name for p in folder.iterdir()} - {".lock"}:
        return
    try:
        previous = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    is_run = isinstance(previous, dict) and {"output_dir", "learning_rate", "batch_size"} <= previous.keys()
    if not is_run and not (folder / "checkpoints").is_dir():
        raise UserError(f"--output-dir {folder} is not empty and holds no training run (no train.py config.json); "
                        "choose a new or empty folder")


def check_run_config(folder: Path, cfg: TrainConfig, write: bool = True) -> None:
    """Write the resolved configuration, or check that a resumed run uses the same one."""
    path = folder / "config.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
        if previous is not None:
            now = json.loads(json.dumps(cfg.resumable_fields()))
            before = {k: previous.get(k) for k in now}
            changed = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now if before[k] != now[k]]
            if changed:
                raise UsageError(f"{folder} holds a run with other settings ({'; '.join(changed)}); "
                                 "rerun with the same options to resume, or choose another --output-dir")
    if write:
        # the resolved settings, with what a data-config file said (resumable_fields adds it)
        write_text_atomic(path, json.dumps({**dataclasses.asdict(cfg), **cfg.resumable_fields()}, indent=2) + "\n")


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """The metrics.jsonl records of steps <= up_to_step (a resumed run drops what came after its checkpoint)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


# ----------------------------------------------------------------------------- checkpoints

class Checkpoints:
    """Orbax checkpoints of the whole TrainState and of the input's position (the streams' state, JSON):
    with the step (the dropout rng is a function of it), all a resumed run needs.

    orbax is imported and its manager made only when a checkpoint is read or written: importing it
    took 1 s alone and about 4 s at a run's start, where it competed with the programs' lowering
    for the interpreter. `import_soon` imports it on a background thread once training runs."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder.absolute(), keep
        self._manager = None
        self._writing: int | None = None  # the step of the save in flight
        self.write_seconds: float | None = None  # the latest complete checkpoint's, from save() to complete

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            self._ocp = ocp
            logging.getLogger("absl").addFilter(_reraised_by_orbax)
            _quiet_orphaned_writes()
            if jax.process_index() == 0 and self.folder.is_dir():
                # What a process killed while writing left (kill -9, a second Ctrl-C): orbax removes such a
                # folder only when it writes the same step again. The run holds the output folder's lock.
                for stale in self.folder.glob("*.orbax-checkpoint-tmp*"):
                    shutil.rmtree(stale, ignore_errors=True)
            self._manager = ocp.CheckpointManager(
                self.folder, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))
        return self._manager

    def import_soon(self) -> None:
        threading.Thread(target=importlib.import_module, args=("orbax.checkpoint",), daemon=True,
                         name="minilm-jax-import-orbax").start()

    def latest_step(self) -> int | None:
        if self._manager is None and not self.folder.is_dir():
            return None
        return self.manager.latest_step()

    def save(self, state: Any, input_state: dict) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        self.wait()  # a failure of the previous save is reported as that step's
        self._writing, self._began = step, time.perf_counter()
        ocp = self._ocp
        with self._write_failures():
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            input=ocp.args.JsonSave(input_state)))

    def restore(self, like: Any) -> tuple[Any, dict]:
        """(the TrainState, the input's state) of the latest checkpoint."""
        step = self.manager.latest_step()
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        ocp = self._ocp
        if not (self.folder / str(step) / "input").is_dir():
            raise UserError(f"checkpoint {step} in {self.folder} holds no input position (it was written before "
                            "minilm-jax 0.4 streamed its training data), so it cannot resume to the row; start again "
                            "in a new --output-dir, or resume it with the version that wrote it")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                          input=ocp.args.JsonRestore()))
            return restored["state"], restored["input"]
        except ValueError as e:  # orbax: the saved tree is not this TrainState's
            raise UserError(
                f"checkpoint {step} in {self.manager.directory} does not hold this version's training state "
                f"(its layout changed in minilm-jax 0.2 and 0.3; orbax: {str(e).splitlines()[0].rstrip(':')}); resume it "
                "with the version that wrote it, or start again in a new --output-dir") from e

    def wait(self) -> None:
        if self._manager is not None:
            with self._write_failures():
                self._manager.wait_until_finished()
            if self._writing is not None:
                self.write_seconds, self._writing = time.perf_counter() - self._began, None

    @contextlib.contextmanager
    def _write_failures(self):
        """A checkpoint that cannot be written (a full disk, a read-only folder) is removed, so that the last
        complete one stands and holds no space, and raised as an OSError naming its folder and the cause.
        orbax reports it as tensorstore's ValueError ("RESOURCE_EXHAUSTED: ... [os_error_code='28']")."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - only I/O failures are turned into OSError; the rest re-raised
            code = e.errno if isinstance(e, OSError) else None
            m = re.search(r"os_error_code='?(\d+)", str(e))
            if m:
                code = int(m.group(1))
            if code is None:
                raise
            step, self._writing = self._writing, None
            if jax.process_index() == 0:  # the primary host writes the folder and its temporary name
                for tmp in self.folder.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            kept = max((int(p.name) for p in self.folder.iterdir() if p.name.isdigit()), default=None)
            stands = f"the checkpoint of step {kept} stands" if kept is not None else "no earlier checkpoint exists"
            raise OSError(code, f"could not write the checkpoint of step {step}: {os.strerror(code)}; it was "
                          f"removed and {stands}: make room, then run the same command again to resume",
                          str(self.folder / str(step))) from None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def _reraised_by_orbax(record: logging.LogRecord) -> bool:
    """Drop orbax's logs of a failed background write (an error with its traceback, three times over): the
    error reaches `Checkpoints.wait`, which raises it as one line."""
    return not (record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname)


def _quiet_orphaned_writes() -> None:
    """After a failed checkpoint write (a full disk), the writes of its other arrays still finish in
    tensorstore's threads and report to orbax's event loop, which the failure closed: each is an
    unraisable "RuntimeError: Event loop is closed" that Python prints with a traceback (up to a hundred,
    around the run's one error line; `Checkpoints` raises the failure itself). Those, and only those,
    are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
