"""Stop signals: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask a training run to stop after the dispatch in
flight, at a step that every process agrees on, with a checkpoint of that step; a second SIGINT stops
at once. The run then exits with STOPPED_EXIT, and the same command resumes it.

Why these three: a Compute Engine spot VM gets a soft shutdown (SIGTERM to every process) and is
powered off 30 s later; Kubernetes sends SIGTERM and kills after the grace period (30 s by default);
SLURM sends SIGTERM at the time limit (or the signal of `--signal=USR1@SECONDS`, ahead of it).

Several processes. Every process counts the same dispatch boundaries (the moments between two
device calls), so "stop at boundary S" means the same step everywhere. A process that received a
signal writes S = its next boundary + 2 into the coordination service's key-value store (the first
writer wins: the key cannot be overwritten); every process reads the key at every boundary (one
try_get, about 0.3 ms on 127.0.0.1) and stops at S. S is never behind a process: a process
passes boundary x + 2 only after it has fetched the results of dispatch x (the loop fetches each
dispatch's metrics before it starts the next-but-one), which needs every process to have issued
dispatch x, which the writer (at boundary x) does only after the key is written. So every process
reads the key at boundary x + 2 at the latest.
jax's own `multihost_utils.reached_preemption_sync_point` (SIGTERM only, from a C++ handler) is
switched off in distributed.py: it knows no SIGINT or SIGUSR1, and it agrees on max(step) + 1 in a
background thread, which a process that runs faster than the agreement can pass.

Where a stop is answered: at the dispatch boundaries of the training loop; at its end (after a barrier,
so that every process gives the same answer: a signal during the last dispatch or the evaluation at the
end stops the run before the export); a single process also while it waits for a program to compile,
and before its loop begins (nothing to save: train.py ends at once). A signal that comes once the
loop is over (the export, a final evaluation after the loop) lets the run finish: it is close to its
end, and every process must finish it alike. Measured (bench/preemption.py, bench/RESULTS.md): from
SIGTERM to the exit at the recipe's settings on 2 CPU cores, median 1.0 s and max 1.4 s (4.7 s and
6.4 s under a load average of 11-14).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOPPED_EXIT = 75  # sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_KEY = "minilm_jax/stop"  # in the coordination service's key-value store: "BOUNDARY PROCESS SIGNAL"
_LOOP_END = "minilm_jax/training_loop_end"


class StopSignals:
    """Handlers of SIGNALS that only take note (`received`: the first signal's name). A second SIGINT
    stops at once: with `exit_at_once` (a command line) the process ends there, with one line and
    INTERRUPTED_EXIT, leaving any checkpoint in progress unfinished (the next run removes it); else
    (a library call, e.g. in a notebook) it raises KeyboardInterrupt. Installed in the main thread
    only (Python delivers signals there); elsewhere it does nothing. Use it as a context manager.

    `exit_at_once` on a single process also ends it at once on a stop signal that comes before its
    training loop begins (`training_began`): start-up (reading data, compiling) can take longer than a
    grace period, and nothing is lost before the first step (a kill there is safe: tests/test_crash.py).
    Several processes stop together at their first agreed boundary instead."""

    def __init__(self, exit_at_once: bool = False, one_process: bool = True):
        self.exit_at_once, self.one_process = exit_at_once, one_process
        self.training = False
        self.received: str | None = None
        self._sigint = False
        self._previous: dict = {}

    def install(self, pending: list[int] = ()) -> StopSignals:
        """`pending`: signals that came before (train.py keeps those of its imports), answered now."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        for signum in list(pending):
            self._handle(signum, None)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self._sigint:  # Ctrl-C twice: stop now (the last complete checkpoint stands)
                if not self.exit_at_once:
                    raise KeyboardInterrupt
                _leave("error: interrupted (a second Ctrl-C): stopped at once; the last complete checkpoint stands: "
                       "run the same command again to resume from it", INTERRUPTED_EXIT)
            self._sigint = True
        if self.received is None:
            self.received = signal.Signals(signum).name
        if self.exit_at_once and self.one_process and not self.training:
            _leave(f"stopped: received {self.received} before training began, nothing to save; run the same command "
                   "again to start (or resume from the last checkpoint)", STOPPED_EXIT)

    def training_began(self) -> None:
        self.training = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def leave(stopped: BaseException) -> None:
    """End a command line stopped by a signal (errors.Stopped): its line, and exit STOPPED_EXIT now. The
    checkpoint is complete; background threads (a program still compiling) are not waited for, which
    an ordinary exit would do. Several processes first leave jax's distributed runtime together (they
    stopped at the same step), so that none sees the coordinator vanish."""
    if "jax" in sys.modules:
        import jax
        from jax._src import distributed as jax_distributed

        if jax_distributed.global_state.client is not None:
            jax.distributed.shutdown()
    _leave(f"stopped: {stopped}", STOPPED_EXIT)


def _leave(line: str, status: int) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(status)  # not even orbax's or the compiler's threads are waited for


class StopAgreement:
    """Whether the run stops at a dispatch boundary, decided alike on every process.

    `client`: jax's distributed runtime client (None for a single process, which stops at the first
    boundary after a signal)."""

    def __init__(self, signals: StopSignals, client=None, process: int = 0):
        self.signals, self.client, self.process = signals, client, process
        self.at: int | None = None  # the agreed boundary
        self.cause = ""  # who received what, for the stop line

    @classmethod
    def for_run(cls, signals: StopSignals) -> StopAgreement:
        import jax

        if jax.process_count() == 1:
            return cls(signals)
        from jax._src import distributed as jax_distributed  # the runtime client: no public accessor

        return cls(signals, jax_distributed.global_state.client, jax.process_index())

    def stop_here(self, boundary: int) -> bool:
        if self.at is None:
            if self.client is None:
                if self.signals.received:
                    self.at, self.cause = boundary, f"received {self.signals.received}"
            else:
                self._exchange(boundary, write=True)
        return self.at is not None and boundary >= self.at

    def while_waiting(self, ready) -> bool:
        """Wait until ready() (a program compiling in the background); on a single process, a stop signal
        meanwhile ends the wait and the training here: True. Several processes wait for the program
        (they all need it for the same dispatch) and stop at their next agreed boundary."""
        if self.client is not None:
            return False
        while not ready():
            if self.signals.received:
                self.cause = f"received {self.signals.received}"
                return True
            time.sleep(0.05)
        return False

    def _exchange(self, boundary: int, write: bool) -> None:
        import jax

        if write and self.signals.received:
            try:
                self.client.key_value_set(_KEY, f"{boundary + 2} {self.process} {self.signals.received}")
            except jax.errors.JaxRuntimeError as e:  # another process wrote it first: its value holds
                if "ALREADY_EXISTS" not in str(e):
                    raise
        try:
            value = self.client.key_value_try_get(_KEY)
        except jax.errors.JaxRuntimeError as e:
            if "NOT_FOUND" in str(e):
                return
            raise
        at, process, name = value.split()
        self.at = int(at)
        self.cause = f"received {name}" if int(process) == self.process else f"process {process} received {name}"

    def stop_after_loop(self, timeout_s: int) -> bool:
        """At the end of the training loop: whether a stop was asked for during it (a signal to any
        process). With several processes, after a barrier, so that every one reads the same answer."""
        if self.at is not None:
            return True
        if self.client is None:
            if self.signals.received:
                self.cause = f"received {self.signals.received}"
            return self.signals.received is not None
        self._exchange(1 << 30, write=True)  # a signal noted since the last boundary counts too
        self.at = None
        self.client.wait_at_barrier(_LOOP_END, timeout_s * 1000)
        self._exchange(1 << 30, write=False)  # every write came before the barrier: one answer for all
        return self.at is not None
