"""Several processes (hosts) on JAX's distributed runtime: the command-line options, their checks,
`jax.distributed.initialize`, and what a user sees when a process is lost.

How a multi-process run ends when a process dies (measured with jax 0.10.2: 2 processes x 2 CPU
devices, Gloo collectives on 127.0.0.1, the peer killed with SIGKILL):
- A survivor inside a step whose collective is connected to the dead peer gets a Python
  `JaxRuntimeError` at once ("Gloo AllGather failed ... Connection reset by peer").
- A survivor anywhere else (fetching a step that waits on the peer, in a checkpoint's barrier,
  evaluating) waits until the coordination service has missed the dead process's heartbeats for
  `heartbeat_timeout` seconds. The service then tells every process, and jaxlib's client ends each
  one from C++ with LOG(FATAL): SIGABRT, a C++ stack trace, no Python. Measured after the kill:
  68 s with jax's default of 100 s, 7.7 s with 10 s (train.py: 8.1-9.7 s with 10 s, 17 s with 30 s).
- When process 0, which hosts the coordination service, dies, every other process is ended that
  way at once (0.1 s).
- A Python error does not end a survivor either: jax's atexit handler (`jax.distributed.shutdown`)
  waits at a shutdown barrier for every process, until the heartbeat timeout and the same LOG(FATAL)
  (84 s after the kill with 100 s; most likely the ending issue 11 saw: a Gloo traceback, then a C++
  stack trace 53 s later).
- A coordinator that cannot be reached, or a process that never joins, ends every waiting process
  with LOG(FATAL) (DEADLINE_EXCEEDED on RegisterTask) after `initialization_timeout` + about 6 s
  (measured: 8.3 s for 2, 11.2 s for 5, 16.5 s for 10).

jaxlib offers no Python hook for that LOG(FATAL): its `missed_heartbeat_callback` cannot be given
from Python (jaxlib 0.10.2 ends in `std::bad_cast` when it is called). So `supervise` runs the
training as a child process, passes its output through, and turns the LOG(FATAL) block into one
`error:` line and exit status 1; `exit_on_peer_failure` does the same for the Python errors, and
leaves with os._exit so that jax's shutdown barrier cannot hang.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Iterator, Sequence

from minilm_jax.errors import UsageError, UserError, label, user_facing

DEFAULT_INIT_TIMEOUT = 300  # jax's default: the hosts of a pod slice can start minutes apart
DEFAULT_HEARTBEAT_TIMEOUT = 100  # jax's default
# Set by `supervise` in the training process's environment: a file where it writes who it is, once known.
WORKER_ENV = "MINILM_JAX_DISTRIBUTED_WORKER"
RESUME = "Run the same command on every host again to resume from the last complete checkpoint"


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass(frozen=True)
class Options:
    """How this process joins a multi-process run; `enabled` is False for a single-process run."""

    coordinator_address: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # --distributed: let jax detect the cluster (TPU, SLURM, Open MPI, Kubernetes)
    init_timeout: int | None = None  # None: DEFAULT_INIT_TIMEOUT
    heartbeat_timeout: int | None = None  # None: DEFAULT_HEARTBEAT_TIMEOUT

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None

    @property
    def init_seconds(self) -> int:
        return self.init_timeout or DEFAULT_INIT_TIMEOUT

    @property
    def heartbeat_seconds(self) -> int:
        return self.heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT

    def validate(self) -> None:
        """Usage errors for contradictory or malformed options; touches neither jax nor the network."""
        flags = {"--coordinator-address": self.coordinator_address, "--num-processes": self.num_processes,
                 "--process-id": self.process_id}
        given = [k for k, v in flags.items() if v is not None]
        if given and len(given) < 3:
            missing = [k for k in flags if k not in given]
            raise UsageError(f"{', '.join(given)} needs {' and '.join(missing)} too: give all three "
                             "(the same --coordinator-address and --num-processes on every process, --process-id 0 "
                             "to N-1), or none of them and --distributed to detect the cluster (TPU, SLURM, "
                             "Open MPI, Kubernetes)")
        if not self.enabled:
            for name, value in (("--init-timeout", self.init_timeout), ("--heartbeat-timeout", self.heartbeat_timeout)):
                if value is not None:
                    raise UsageError(f"{name} applies to runs on several processes only; add --distributed or "
                                     "--coordinator-address/--num-processes/--process-id, or drop it")
            return
        for name, value in (("--init-timeout", self.init_timeout), ("--heartbeat-timeout", self.heartbeat_timeout)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1 second, got {value}")
        if self.coordinator_address is None:
            return
        host, port = split_address(self.coordinator_address)
        if self.num_processes < 1:
            raise UsageError(f"--num-processes must be at least 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise UsageError(f"--process-id must be between 0 and --num-processes - 1 = {self.num_processes - 1}, "
                             f"got {self.process_id}")


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port), or a usage error."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]/]+):(\d{1,5})", address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise UsageError(f"--coordinator-address {address!r} is not HOST:PORT (e.g. 10.0.0.1:8476 or "
                         "node001:8476): process 0's host name or IP address and a free TCP port, the same on "
                         "every process")
    return m.group(1).strip("[]"), int(m.group(2))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def add_arguments(group) -> None:
    """The options of a run on several processes, added to an argparse parser or argument group."""
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help="process 0's host and a free port, the same on every process; with --num-processes and "
                       "--process-id, for a launch by hand")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (usually one per host)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1; process 0 hosts "
                       "the coordinator and writes the logs and the model")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run whose processes jax finds itself: a TPU pod slice, a SLURM job "
                       "(srun), Open MPI (mpirun) or Kubernetes")
    group.add_argument("--init-timeout", type=int, metavar="SECONDS",
                       help="how long every process waits for all of them to connect to the coordinator before it "
                       f"gives up (default: {DEFAULT_INIT_TIMEOUT})")
    group.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                       help="a process that has not been heard from for this long counts as lost, and every other "
                       f"one stops (default: {DEFAULT_HEARTBEAT_TIMEOUT})")


ARGUMENT_NAMES = ("coordinator_address", "num_processes", "process_id", "distributed", "init_timeout",
                  "heartbeat_timeout")


def options_from_args(args: dict) -> Options:
    """Options from parsed arguments (a `vars(namespace)`); removes their keys from `args`; validated."""
    values = {name: args.pop(name, None) for name in ARGUMENT_NAMES}
    options = Options(values["coordinator_address"], values["num_processes"], values["process_id"],
                      bool(values["distributed"]), values["init_timeout"], values["heartbeat_timeout"])
    options.validate()
    return options


def parse_options(argv: Sequence[str]) -> Options:
    """The distributed options of a command line, ignoring every other option (checked later)."""
    parser = _Parser(add_help=False)
    add_arguments(parser)
    known, _ = parser.parse_known_args(list(argv))
    return options_from_args(vars(known))


# ----------------------------------------------------------------------------- initialise

_ACTIVE: Options | None = None  # the options `initialize` was given


def is_worker() -> bool:
    """True in the training process that `supervise` started."""
    return bool(os.environ.get(WORKER_ENV))


def initialize(options: Options) -> None:
    """jax.distributed.initialize with these options; call it before anything else uses jax.

    Failures a user can fix are UserErrors. A coordinator that cannot be reached ends the process from
    C++ after --init-timeout (see the module docstring); `supervise` explains that ending.
    """
    import jax

    kwargs = {"initialization_timeout": options.init_seconds, "heartbeat_timeout_seconds": options.heartbeat_seconds}
    if options.coordinator_address is not None:
        # Explicit flags mean exactly that: no cluster detection (on SLURM it would also pick one GPU per process).
        kwargs.update(coordinator_address=options.coordinator_address, num_processes=options.num_processes,
                      process_id=options.process_id, cluster_detection_method="deactivate")
    # jax's preemption service catches SIGTERM in C++ for `reached_preemption_sync_point`; train.py's
    # own stop signals (preemption.py) replace it, for SIGINT and SIGUSR1 too.
    jax.config.update("jax_enable_preemption_service", False)
    global _ACTIVE
    if options.coordinator_address is not None and options.process_id == 0:
        _check_coordinator_port(options.coordinator_address)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError:  # auto-detection found no cluster ("coordinator_address should be defined.")
        raise UsageError("--distributed found no cluster to join: jax detects TPU pod slices, SLURM jobs (srun), "
                         "Open MPI (mpirun) and Kubernetes, and none is here. Elsewhere pass --coordinator-address "
                         "HOST:PORT --num-processes N --process-id I on every process") from None
    except jax.errors.JaxRuntimeError as e:
        if "Failed to start RPC server" in str(e):
            raise UserError(_port_taken_message(options.coordinator_address)) from None
        raise
    _ACTIVE = options
    info = os.environ.get(WORKER_ENV)
    if info and info != "1":  # for `supervise`'s messages (with --distributed, jax found these itself)
        from jax._src import distributed as jax_distributed  # the address jax resolved: no public accessor

        address = getattr(getattr(jax_distributed, "global_state", None), "coordinator_address", None)
        with open(info, "w", encoding="utf-8") as f:
            json.dump({"process_id": jax.process_index(), "num_processes": jax.process_count(),
                       "coordinator_address": address or options.coordinator_address}, f)


def barrier_seconds() -> int:
    """How long a process waits at a barrier of its own for the others: --init-timeout (they are at most
    a dispatch apart; a lost one ends every process within --heartbeat-timeout anyway)."""
    return (_ACTIVE or Options()).init_seconds


def _port_taken_message(address: str | None) -> str:
    return (f"process 0 could not start the coordinator on {address or 'its port'} (the port is in use or not "
            "allowed); choose another port in --coordinator-address, the same on every process")


def _check_coordinator_port(address: str) -> None:
    """A UserError if process 0 cannot listen on the coordinator's port.

    The coordination service listens on every interface ([::]:PORT). When that port is taken, gRPC's
    failure sometimes comes back as an error and sometimes as a crash (SIGSEGV) inside jax, so the port
    is tried here first, as gRPC binds it (SO_REUSEADDR: a port in TIME_WAIT is free, a listener is not).
    """
    _, port = split_address(address)
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host: try IPv4
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack, as gRPC
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise UserError(_port_taken_message(address)) from None
                continue  # e.g. IPv6 disabled: try IPv4
            return


# ----------------------------------------------------------------------------- failures in Python

_PEER_SIGNS = re.compile(r"Gloo|Connection (?:reset|closed|refused)|Broken pipe|heartbeat|coordination service|"
                         r"[Bb]arrier|UNAVAILABLE|DEADLINE_EXCEEDED")


def is_peer_failure(exc: BaseException) -> bool:
    """True if `exc` is JAX's runtime failing because another process of a multi-process run is gone."""
    try:
        import jax
    except ImportError:
        return False
    if not isinstance(exc, jax.errors.JaxRuntimeError):
        return False
    return jax.process_count() > 1 and bool(_PEER_SIGNS.search(str(exc)))


def _first_line(text: str, limit: int = 200) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _leave(message: str | None, code: int, word: str = "error") -> None:
    """Print one `error:` line (or nothing) and end the process now, without jax's atexit shutdown
    barrier, which would wait for the lost process until the heartbeat timeout and then abort."""
    if message is not None:
        print(f"{word}: {message}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_on_peer_failure(exc: BaseException, options: Options | None = None) -> None:
    """If `exc` says another process is gone, end this process with one `error:` line and exit status 1;
    otherwise return (the caller re-raises).

    Call it where such an error can surface before anything that would wait for the lost process
    (a checkpoint's wait, a barrier): `except Exception as e: distributed.exit_on_peer_failure(e); raise`.
    With two processes the lost one is the other; with more, the coordination service names it
    (this process waits for its verdict, at most the heartbeat timeout, and `supervise` reports it).
    """
    if not is_peer_failure(exc):
        return
    import jax

    me, n = jax.process_index(), jax.process_count()
    detail = _first_line(str(exc)).removeprefix("UNKNOWN: ")
    if n == 2:
        _leave(f"lost process {1 - me} of 2: the connection to it broke during a collective ({detail}): it stopped "
               f"(see its output), was killed or its host became unreachable; this process ({me}) stopped too. {RESUME}", 1)
    # Several peers: a broken connection does not say which process died (a survivor that already
    # stopped breaks its connections too). The coordination service knows within the heartbeat
    # timeout and ends this process with its verdict, which `supervise` reports.
    heartbeat = (options or _ACTIVE or Options()).heartbeat_seconds
    time.sleep(heartbeat + 15)
    _leave(f"lost the connection to another process during a collective ({detail}); it died, was killed or its "
           f"host became unreachable, and the coordination service named no process within {heartbeat + 15} s; "
           f"this process ({me} of {n}) stopped too. {RESUME}", 1)


@contextlib.contextmanager
def failures_reported(options: Options) -> Iterator[None]:
    """Around the work of a multi-process run (no-op for a single process): any failure ends this process at
    once, with one `error:` line (a traceback for a bug), so that it never waits for peers at exit; except
    one that every process raises alike (`every_process`: a stop, a refused output folder), which ends
    them all normally."""
    if not options.enabled:
        yield
        return
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - every path must leave without jax's shutdown barrier
        if isinstance(e, SystemExit) or getattr(e, "every_process", False):
            raise  # every process ends here alike (stopped at the same step): a normal exit, with jax's shutdown
        said = user_facing(e)
        if said is not None:
            _leave(*said, label(e))
        exit_on_peer_failure(e, options)
        traceback.print_exc()
        _leave(None, 1)


# ----------------------------------------------------------------------------- the supervisor

# An absl log line of the C++ runtime, e.g. "E1130 10:35:52.974471    5786 coordination_service.cc:1549] ..."
_LOG_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w.]+):\d+\] ")
_HOLD_SOURCES = (b"coordination_service", b"preemption_sync_manager", b"client.h", b"distributed")
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_HOLD_SECONDS = 3.0  # runtime log lines are held this long, in case a LOG(FATAL) follows them


class _StderrFilter:
    """Passes the training process's stderr through, except the coordination service's LOG(FATAL) and the
    runtime lines that lead to it, which it keeps for `explain_fatal`."""

    def __init__(self, out):
        self.out = out
        self.pending = b""  # an unfinished line
        self.held: list[bytes] = []
        self.hold_until: float | None = None
        self.fatal = False
        self.port_failure = False  # gRPC could not listen on the coordinator's port (it may crash after)

    def feed(self, data: bytes) -> None:
        self.pending += data
        while True:
            cut = min((i for i in (self.pending.find(b"\n"), self.pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, self.pending = self.pending[: cut + 1], self.pending[cut + 1:]
            self._segment(segment)
        self.out.flush()

    def _segment(self, segment: bytes) -> None:
        if b"Failed to add port to server" in segment:
            self.port_failure = True
        if self.fatal:
            self.held.append(segment)
            return
        m = _LOG_LINE.match(segment)
        if m and any(s in m.group(1) for s in _HOLD_SOURCES) or _FATAL in segment:
            self.hold_until = time.monotonic() + _HOLD_SECONDS
        if _FATAL in segment:
            self.fatal = True
        if self.hold_until is not None:
            self.held.append(segment)
        else:
            self.out.write(segment)

    def timeout(self) -> float | None:
        """Seconds until held lines are released (None: nothing held)."""
        if self.hold_until is None or self.fatal:
            return None
        return max(0.0, self.hold_until - time.monotonic())

    def tick(self) -> None:
        if self.hold_until is not None and not self.fatal and time.monotonic() >= self.hold_until:
            self.out.write(b"".join(self.held))
            self.held, self.hold_until = [], None
            self.out.flush()

    def close(self) -> str | None:
        """At the end of the output: the LOG(FATAL) text if there was one (and nothing more is written)."""
        if self.pending:
            self._segment(self.pending)
            self.pending = b""
        if self.fatal:
            return b"".join(self.held).decode("utf-8", "replace")
        self.out.write(b"".join(self.held))
        self.out.flush()
        return None


def _lost_tasks(text: str) -> list[int]:
    m = re.search(r"stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)", text)
    if m:
        return sorted({int(x) for x in re.findall(r"\d+", m.group(1))})
    return sorted({int(x) for x in re.findall(r"(?:task:|Task )(\d+)(?: heartbeat timeout|\b)", text)})


def _coordinator_answers(address: str | None) -> bool | None:
    if not address:
        return None
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def explain_fatal(text: str, options: Options, who: dict) -> str:
    """One line for the coordination service's LOG(FATAL) text: which process was lost, and what to do."""
    me, n = who.get("process_id", options.process_id), who.get("num_processes", options.num_processes)
    address = who.get("coordinator_address") or options.coordinator_address
    this = f"this process ({me})" if me is not None else "this process"
    of_n = f" of {n}" if n else ""
    if "RegisterTask" in text and "DEADLINE_EXCEEDED" in text:
        wait = options.init_seconds
        where = f"the coordinator at {address}" if address else "the coordinator"
        if me == 0:
            return (f"{where} waited {wait} s (--init-timeout) but not all{of_n} processes connected; start the same "
                    "command on every host (the same --coordinator-address and --num-processes, --process-id 0 to "
                    "N-1), or raise --init-timeout")
        if _coordinator_answers(address) is False:
            return (f"could not reach {where} within {wait} s (--init-timeout): nothing answers there. Start process 0 "
                    "first, check the host name, port and firewall, or raise --init-timeout")
        return (f"{this} reached {where}, but not all{of_n} processes joined within {wait} s (--init-timeout); start "
                "the same command on every host (--process-id 0 to N-1), or raise --init-timeout")
    lost = [t for t in _lost_tasks(text) if t != me]
    if lost:
        names = ", ".join(map(str, lost))
        return (f"lost process{'es' if len(lost) > 1 else ''} {names}{of_n}: the coordinator heard nothing from "
                f"{'them' if len(lost) > 1 else 'it'} for {options.heartbeat_seconds} s (--heartbeat-timeout), so "
                f"{'they' if len(lost) > 1 else 'it'} died, {'were' if len(lost) > 1 else 'was'} killed or lost the "
                f"network; {this} stopped too. {RESUME}")
    if "coordination service" in text and re.search(r"Failed to send RPC|Socket closed|Connection reset|UNAVAILABLE",
                                                      text):
        return (f"lost process 0{of_n}, the coordinator{' at ' + address if address else ''}: the connection to it "
                f"broke, so it died, was killed or its host became unreachable; {this} stopped too. {RESUME}")
    status = re.search(r"absl::Status: ([^\n]*)", text)
    detail = status.group(1).strip() if status else _first_line(text)
    return f"the JAX distributed runtime stopped {this}: {detail[:300]}. {RESUME}"


def _die_with_parent(parent: int):
    def preexec() -> None:  # in the child, between fork and exec
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a SIGKILLed supervisor takes us along
        except (OSError, AttributeError):  # not Linux
            pass
        if os.getppid() != parent:  # the supervisor died before prctl
            os._exit(1)
        # A process group of its own: a Ctrl-C at the terminal reaches the supervisor only, which passes
        # it on once (the training process stops at once on a second SIGINT).
        os.setpgid(0, 0)

    return preexec


def supervise(command: Sequence[str], options: Options) -> int:
    """Run `command` (this command line, again) as the training process and return the exit status to use.

    Its stdout and stdin are this process's. Its stderr passes through, except a LOG(FATAL) of the
    coordination service, which becomes one `error:` line and exit status 1 (see the module docstring).
    SIGTERM, SIGINT, SIGUSR1 and SIGHUP are passed on (the stop signals of preemption.py; the training
    process is in a process group of its own, so that a terminal's Ctrl-C reaches it once).
    """
    import tempfile

    fd, info_path = tempfile.mkstemp(prefix="minilm-jax-process-", suffix=".json")
    os.close(fd)
    env = dict(os.environ, **{WORKER_ENV: info_path})
    proc = subprocess.Popen(list(command), stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent(os.getpid()))

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
    out = _StderrFilter(sys.stderr.buffer)
    stream = proc.stderr.fileno()
    try:
        while True:
            try:
                ready, _, _ = select.select([stream], [], [], out.timeout())
            except InterruptedError:
                continue
            out.tick()
            if ready:
                data = os.read(stream, 65536)
                if not data:
                    break
                out.feed(data)
        rc = proc.wait()
        fatal = out.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            with open(info_path, encoding="utf-8") as f:
                who = json.load(f)
        except (OSError, ValueError):
            who = {}
        with contextlib.suppress(OSError):
            os.remove(info_path)
    if fatal is not None:
        print(f"error: {explain_fatal(fatal, options, who)}", file=sys.stderr)
        return 1
    if rc < 0 and out.port_failure and who.get("process_id", options.process_id) == 0:  # lost the race to the port
        print(f"error: {_port_taken_message(options.coordinator_address)}", file=sys.stderr)
        return 1
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        print(f"error: the training process was stopped by {name}"
              f"{' (out of memory?)' if -rc == signal.SIGKILL else ''}. {RESUME}", file=sys.stderr)
        return 128 - rc
    return rc
