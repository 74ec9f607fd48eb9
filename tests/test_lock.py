"""The locked test environment (tests/requirements-lock.txt) against the project's declared dependencies:
every dependency of the library and of its test extra is pinned there, each pin satisfies the range that
pyproject.toml declares, and tests/lock_check.py tells a locked venv from a drifted one."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lock_check

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "tests" / "requirements-lock.txt"


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return [r for r in reqs if canonicalize_name(r.name) != "minilm-jax"]


def test_every_declared_dependency_is_pinned_within_its_range():
    locked = lock_check.locked_versions(LOCK)
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is a declared dependency but {LOCK.name} does not pin it"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={locked[name]}, outside pyproject's {req.specifier}"
    assert locked["torch"] == "2.13.0"  # the CPU build on this machine's disk


def test_lock_check_names_a_drifted_package(tmp_path):
    drifted = tmp_path / "lock.txt"
    drifted.write_text("# a lock with one wrong pin\nnumpy==0.0.1\npytest==" + __import__("pytest").__version__ + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "lock_check.py"), str(drifted)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "numpy: installed" in out.stderr and "locked 0.0.1" in out.stderr
    assert "pytest" not in out.stderr.split("error: 1 package")[0]
    warned = subprocess.run([sys.executable, str(ROOT / "tests" / "lock_check.py"), "--warn", str(drifted)],
                            capture_output=True, text=True)
    assert warned.returncode == 0 and "warning: numpy: installed" in warned.stderr
    not_a_pin = tmp_path / "range.txt"
    not_a_pin.write_text("numpy>=1\n")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "lock_check.py"), str(not_a_pin)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "line 1: 'numpy>=1' is not an exact pin" in out.stderr
