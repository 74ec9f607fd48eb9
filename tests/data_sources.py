"""Where the tests find their real data, and how they fetch it when it is nowhere.

The tests read four files (TSV, header `sentence1<TAB>sentence2<TAB>score`, quoting disabled):
stsb_train.tsv, stsb_dev.tsv (STS Benchmark, scores 0-5), quora_train.tsv, quora_dev.tsv (Quora
duplicate questions, 1.0 = duplicate). They are looked for, in this order:

1. `../shared/data` beside the repository (the project's own copy). If that folder exists it
   must hold all four files: an incomplete one is an error, never a fallback.
2. The folder named by `$MINILM_JAX_TEST_DATA` (an error if it is set but lacks a file).
3. A cache of files fetched from the Hugging Face hub: `$MINILM_JAX_TEST_DATA_CACHE`, else
   `$XDG_CACHE_HOME/minilm_jax/test-data`, else `~/.cache/minilm_jax/test-data`. When it is
   empty the files are fetched with `datasets`, through the same `minilm_jax.pairs.load_hub_pairs`
   that `train.py --dataset` uses (`MINILM_JAX_TEST_FETCH=0` forbids the fetch):
     - sentence-transformers/stsb, splits train and validation: its 0-1 scores times 5;
     - sentence-transformers/quora-duplicates, subset pair-class, column label: one shuffle
       (numpy seed 20240601), the first 5,000 pairs to quora_dev.tsv and the next 32,944 to
       quora_train.tsv (the sizes of the shared files).
   **The fetched files do not hold the same rows as ../shared/data** (the shared Quora files are
   pooled from other sources, class-balanced and checked against a held-out set; see
   ../shared/data/SOURCES.md). A test that asserts a figure of the shared files takes the
   `shared_data_figures` fixture, which skips it on any other data.

With none of the three the data tests are skipped, each with one line that starts with
`data: ` (SKIP_PREFIX); `.ci/run` fails when such a skip happens while ../shared/data exists.

Run `python tests/data_sources.py fetch OUT` to fetch the files into OUT yourself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = (REPO_ROOT / ".." / "shared" / "data").resolve()
DATA_FILES = ("stsb_train.tsv", "stsb_dev.tsv", "quora_train.tsv", "quora_dev.tsv")
# The shared files, byte for byte: a folder holding these is the shared data, wherever it lies.
SHARED_SHA256 = {
    "stsb_train.tsv": "b97facaf6a70b91ff22327f3f8151cbe3db3199244a217a57e036a05ca70fcce",
    "stsb_dev.tsv": "91d32f7408afd224802f8e1687281ec54e8448f743c3daf7790c7305f21486bc",
    "quora_train.tsv": "cd17b694e1116f0bb188eecbe3fc7db3a0082ae66c6a5a0623d1ffb10b829b79",
    "quora_dev.tsv": "5ecdadeb7ac077b6a26a1e5596405fe17a31aa88bdd71d060a93ac6b4bc89af8",
}
ENV_DIR = "MINILM_JAX_TEST_DATA"
ENV_CACHE = "MINILM_JAX_TEST_DATA_CACHE"
ENV_FETCH = "MINILM_JAX_TEST_FETCH"
SKIP_PREFIX = "data: "
HEADER = "sentence1\tsentence2\tscore\n"
COMPLETE_MARKER = ".complete"

STSB = "sentence-transformers/stsb"
QUORA, QUORA_SUBSET = "sentence-transformers/quora-duplicates", "pair-class"
QUORA_SEED, QUORA_DEV, QUORA_TRAIN = 20240601, 5_000, 32_944
STS_SCALE = 5.0  # the hub's stsb has the 0-5 gold scores divided by 5
FETCH_TIMEOUT_S = 1800


class DataConfigError(Exception):
    """A data folder was named (or exists) but is unusable: a setup mistake, reported as an error."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    path: Path | None  # None: no data
    kind: str  # "shared" | "env" | "hub" | "none"
    detail: str  # one line: where the files come from, or why there are none

    def is_shared_copy(self) -> bool:
        """Whether the four files are byte-identical to ../shared/data's (hashed once per source)."""
        return self.path is not None and _same_as_shared(self.path)


def _same_as_shared(folder: Path) -> bool:
    return all(_sha256(folder / name) == digest for name, digest in SHARED_SHA256.items())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def missing_files(folder: Path) -> list[str]:
    return [name for name in DATA_FILES if not (folder / name).is_file()]


def default_cache_dir(environ: dict) -> Path:
    if environ.get(ENV_CACHE):
        return Path(environ[ENV_CACHE]).expanduser()
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minilm_jax" / "test-data"


def find_data(shared_dir: Path, environ: dict, fetch=None) -> DataSource:
    """The first data source that exists (see the module docstring). `environ` is the environment
    the user started pytest with; `fetch(cache_dir) -> str | None` fetches into the cache and
    returns why it could not (None when it did), or is None to never fetch."""
    if shared_dir.is_dir():
        if missing := missing_files(shared_dir):
            raise DataConfigError(f"{shared_dir} exists but lacks {', '.join(missing)}; restore the shared data "
                                  "(the tests never fall back to other data while it is there)")
        return DataSource(shared_dir, "shared", f"{shared_dir}")
    named = environ.get(ENV_DIR, "")
    if named:
        folder = Path(named).expanduser().resolve()
        if not folder.is_dir():
            raise DataConfigError(f"${ENV_DIR}={named} is not a folder; point it at a folder with {', '.join(DATA_FILES)}")
        if missing := missing_files(folder):
            raise DataConfigError(f"${ENV_DIR}={named} lacks {', '.join(missing)}")
        return DataSource(folder, "env", f"${ENV_DIR}={folder}")
    cache = default_cache_dir(environ)
    if (cache / COMPLETE_MARKER).is_file() and not missing_files(cache):
        return DataSource(cache, "hub", f"hub copies in {cache}")
    tried = f"{shared_dir} is missing, ${ENV_DIR} is not set"
    if fetch is None or environ.get(ENV_FETCH, "1") == "0":
        return DataSource(None, "none", f"{tried}, and fetching from the hub is off (${ENV_FETCH}=0)")
    why = fetch(cache)
    if why is None and not missing_files(cache):
        return DataSource(cache, "hub", f"hub copies in {cache}")
    return DataSource(None, "none", f"{tried}, and the hub fetch failed ({why or 'files missing after the fetch'})")


def skip_reason(source: DataSource) -> str:
    return (f"{SKIP_PREFIX}no real data: {source.detail}; put the data in ../shared/data or ${ENV_DIR} "
            "(README: \"The tests' data\")")


# ----------------------------------------------------------------------------- fetching

def hub_unreachable(environ: dict, timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (a cheap check before datasets' slow retries), or None.
    Behind a proxy, or offline with a warm datasets cache, datasets is left to try."""
    if any(environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    if environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return None
    endpoint = urllib.parse.urlparse(environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} is not reachable: {e}"


def fetch_in_subprocess(environ: dict):
    """A `fetch` for find_data: this script in a fresh process with the user's environment (the
    test session itself runs with the hub switched off)."""

    def fetch(cache: Path) -> str | None:
        if why := hub_unreachable(environ):
            return why
        env = dict(environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), environ.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.run([sys.executable, __file__, "fetch", str(cache)], env=env, capture_output=True,
                                  text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"no answer within {FETCH_TIMEOUT_S} s"
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            return (lines[-1] if lines else f"exit {proc.returncode}")[:300]
        return None

    return fetch


def format_score(value: float) -> str:
    """A score as the shared files write it: the shortest decimal within float noise of the value
    (a hub score x 5 gives 3.8000000000000003 for the 3.8 of the original file, 2.33333333333333
    stays as it is)."""
    value = float(value)
    for digits in range(16):
        rounded = round(value, digits)
        if abs(rounded - value) <= 4 * math.ulp(value):
            return repr(rounded)
    return repr(value)


def pairs_tsv(pairs, scale: float = 1.0) -> str:
    """Pairs as the shared TSV files are written: one header, tabs and newlines inside a sentence
    replaced by one space, outer whitespace removed, rows with an empty sentence dropped."""
    import re

    def clean(text: str) -> str:
        return re.sub(r"[\t\r\n]+", " ", text).strip()

    lines = [HEADER]
    for a, b, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores):
        a, b = clean(a), clean(b)
        if a and b:
            lines.append(f"{a}\t{b}\t{format_score(score * scale)}\n")
    return "".join(lines)


def quora_split(n: int):
    """Indices of (dev, train) of the fetched Quora pairs: a fixed shuffle, then 5,000 / 32,944."""
    import numpy as np

    order = np.random.default_rng(QUORA_SEED).permutation(n)
    return order[:QUORA_DEV], order[QUORA_DEV:QUORA_DEV + QUORA_TRAIN]


def fetch_hub_data(out: Path) -> None:
    """Fetch the four files into `out` (replaced as a whole, never left half-written)."""
    import shutil
    import tempfile

    from minilm_jax.pairs import Columns, load_hub_pairs

    stsb_train = load_hub_pairs(STSB, None, "train", Columns())
    stsb_dev = load_hub_pairs(STSB, None, "validation", Columns())
    quora = load_hub_pairs(QUORA, QUORA_SUBSET, "train", Columns(score="label"))
    dev_idx, train_idx = quora_split(len(quora))
    texts = {
        "stsb_train.tsv": pairs_tsv(stsb_train, STS_SCALE),
        "stsb_dev.tsv": pairs_tsv(stsb_dev, STS_SCALE),
        "quora_train.tsv": pairs_tsv(quora.select(train_idx)),
        "quora_dev.tsv": pairs_tsv(quora.select(dev_idx)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "SOURCES.md").write_text(
            "Fetched by tests/data_sources.py from the Hugging Face hub: "
            f"{STSB} (train, validation; scores x{STS_SCALE:g}) and {QUORA} ({QUORA_SUBSET}; shuffled with seed "
            f"{QUORA_SEED}, {QUORA_DEV} dev / {QUORA_TRAIN} train pairs).\n"
            "These are not the rows of the project's ../shared/data files.\n", encoding="utf-8")
        (tmp / COMPLETE_MARKER).write_text("", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "fetch":
        print("usage: python tests/data_sources.py fetch OUT", file=sys.stderr)
        return 2
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from minilm_jax.errors import UserError

    try:
        fetch_hub_data(Path(argv[1]).expanduser().absolute())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(DATA_FILES)} to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
