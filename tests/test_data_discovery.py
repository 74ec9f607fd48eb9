"""How the tests find their data (tests/data_sources.py, tests/conftest.py) and how `.ci/run` refuses to
pass by skipping: the lookup order, the errors for a named but unusable folder, the format of the
files fetched from the hub, and whole pytest / .ci/run sessions in a scratch checkout that holds
this repository's conftest, with and without ../shared/data beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, data_source
from data_sources import (COMPLETE_MARKER, DATA_FILES, ENV_DIR, SKIP_PREFIX, DataConfigError, fetch_in_subprocess,
                          find_data, hub_unreachable, pairs_tsv, quora_split, skip_reason)


def _data_folder(folder: Path, source: Path, names=DATA_FILES) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


def _no_fetch(cache):
    raise AssertionError("find_data fetched although a data folder was there")


def test_lookup_order(tmp_path, data_dir):
    shared, named, cache = tmp_path / "shared", tmp_path / "named", tmp_path / "cache"
    env = {"MINILM_JAX_TEST_DATA_CACHE": str(cache)}
    # Nothing anywhere, fetching off: no data, and why in one line.
    none = find_data(shared, {**env, "MINILM_JAX_TEST_FETCH": "0"}, fetch=_no_fetch)
    assert none.path is None and none.kind == "none"
    reason = skip_reason(none)
    assert reason.startswith(SKIP_PREFIX) and "\n" not in reason and str(shared) in reason and ENV_DIR in reason
    # The named folder, then ../shared/data before it.
    _data_folder(named, data_dir)
    assert find_data(shared, {**env, ENV_DIR: str(named)}, fetch=_no_fetch).kind == "env"
    _data_folder(shared, data_dir)
    found = find_data(shared, {**env, ENV_DIR: str(named)}, fetch=_no_fetch)
    assert (found.kind, found.path) == ("shared", shared)
    assert found.is_shared_copy() == data_source().is_shared_copy()  # copies of the files in use


def test_the_hub_cache_is_used_once_complete_and_a_failed_fetch_says_why(tmp_path, data_dir):
    shared, cache = tmp_path / "shared", tmp_path / "cache"
    env = {"MINILM_JAX_TEST_DATA_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on 9
    failed = find_data(shared, env, fetch=fetch_in_subprocess(env))
    assert failed.path is None and "the hub fetch failed (127.0.0.1 is not reachable" in failed.detail
    _data_folder(cache, data_dir)
    assert find_data(shared, env, fetch=fetch_in_subprocess(env)).path is None  # no .complete: a half-written cache
    (cache / COMPLETE_MARKER).write_text("")
    found = find_data(shared, env, fetch=_no_fetch)
    assert (found.kind, found.path) == ("hub", cache)


def test_hub_probe_steps_aside_for_proxies_and_offline_caches():
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    assert "not reachable" in hub_unreachable(unreachable)
    assert hub_unreachable({**unreachable, "HTTPS_PROXY": "http://proxy:3128"}) is None
    assert hub_unreachable({**unreachable, "HF_HUB_OFFLINE": "1"}) is None


def test_a_named_folder_that_is_unusable_is_an_error(tmp_path, data_dir):
    env = {"MINILM_JAX_TEST_DATA_CACHE": str(tmp_path / "cache")}
    with pytest.raises(DataConfigError, match=r"MINILM_JAX_TEST_DATA=.*nope is not a folder"):
        find_data(tmp_path / "shared", {**env, ENV_DIR: str(tmp_path / "nope")}, fetch=_no_fetch)
    partial = _data_folder(tmp_path / "partial", data_dir, names=DATA_FILES[:3])
    with pytest.raises(DataConfigError, match="lacks quora_dev.tsv"):
        find_data(tmp_path / "shared", {**env, ENV_DIR: str(partial)}, fetch=_no_fetch)
    # An incomplete ../shared/data is an error, not a reason to use other data.
    with pytest.raises(DataConfigError, match="exists but lacks quora_dev.tsv"):
        find_data(partial, {**env, ENV_DIR: str(tmp_path / "elsewhere")}, fetch=_no_fetch)


@pytest.mark.parametrize("name,scale", [("stsb_dev.tsv", 5.0), ("quora_dev.tsv", 1.0)])
def test_fetched_files_are_written_as_the_data_files_are(data_dir, name, scale):
    """The writer of the hub copies, given the pairs as the hub has them (STS-B scores in [0, 1]),
    reproduces a data file byte for byte: same header, same cleaning, same score format."""
    from minilm_jax.pairs import load_pairs

    pairs = load_pairs(str(data_dir / name), score_scale=scale)
    assert pairs.scores.max() <= 1.0
    assert pairs_tsv(pairs, scale) == (data_dir / name).read_text(encoding="utf-8")


def test_quora_split_is_fixed_disjoint_and_sized_as_the_shared_files():
    dev, train = quora_split(404_290)
    again_dev, again_train = quora_split(404_290)
    assert (dev == again_dev).all() and (train == again_train).all()
    assert (len(dev), len(train)) == (5_000, 32_944) and not set(dev.tolist()) & set(train.tolist())


# ----------------------------------------------------------------------------- whole sessions

SESSION_TESTS = '''
import pytest
from data_sources import SKIP_PREFIX

def test_with_data(data_dir):
    assert (data_dir / "stsb_dev.tsv").is_file()

def test_without_data():
    pass

def test_skipped_for_data_by_hand():
    pytest.skip(SKIP_PREFIX + "a data test that skips although the data is there (a regression)")
'''


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A scratch checkout: this repo's conftest, data_sources, lock and .ci/run, the venv, one test file."""
    root = tmp_path / "clone"
    (root / "tests").mkdir(parents=True)
    for name in ("conftest.py", "data_sources.py", "lock_check.py", "requirements-lock.txt"):
        shutil.copy(REPO_ROOT / "tests" / name, root / "tests" / name)
    (root / "tests" / "test_session.py").write_text(SESSION_TESTS)
    shutil.copytree(REPO_ROOT / ".ci", root / ".ci")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    os.symlink(Path(sys.executable).parents[1], root / ".venv")
    return root


def _session(root: Path, *argv, env=None, ci=False) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MINILM_JAX_TEST", "MINILM_JAX_DATA"))}
    base.update({"MINILM_JAX_TEST_FETCH": "0", "PYTHONPATH": str(REPO_ROOT), "MINILM_JAX_TEST_DATA_CACHE":
                 str(root / "no-cache")}, **(env or {}))
    command = ["bash", ".ci/run", *argv] if ci else [sys.executable, "-m", "pytest", "-q", "-rs", *argv]
    return subprocess.run(command, cwd=root, env={**base, "CI_REUSE_VENV": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_a_checkout_without_data_skips_the_data_tests_with_one_line(checkout):
    proc = _session(checkout, "tests/test_session.py", "-k", "not by_hand",
                    env={"MINILM_JAX_DATA_SKIPS": str(checkout / "skips.txt")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert f": {SKIP_PREFIX}no real data: {checkout.parent / 'shared' / 'data'} is missing" in line
    assert "fetching from the hub is off" in line
    assert (checkout / "skips.txt").read_text().startswith("tests/test_session.py::test_with_data: data: no real data")


def test_shared_data_beside_the_checkout_is_found(checkout, data_dir):
    (checkout.parent / "shared").mkdir()
    os.symlink(data_dir, checkout.parent / "shared" / "data")
    proc = _session(checkout, "tests/test_session.py", "-k", "not by_hand")
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ci_passes_with_data_skips_without_shared_data_and_fails_with_it(checkout, data_dir):
    alone = _session(checkout, "tests/test_session.py", ci=True)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "== 2 data tests skipped, for these reasons:" in alone.stdout
    assert "\n  data: no real data: " in alone.stdout and "\n  tests/test_session.py::test_with_data\n" in alone.stdout
    (checkout.parent / "shared").mkdir()
    os.symlink(data_dir, checkout.parent / "shared" / "data")
    beside = _session(checkout, "tests/test_session.py", ci=True)
    assert beside.returncode == 1, beside.stdout + beside.stderr
    assert "== 1 data tests skipped, for these reasons:" in beside.stdout
    assert "\n  tests/test_session.py::test_skipped_for_data_by_hand\n" in beside.stdout
    assert "error: 1 data tests were skipped although ../shared/data exists" in beside.stderr
    assert "2 passed, 1 skipped" in beside.stdout
