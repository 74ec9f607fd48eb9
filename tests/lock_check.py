"""Checks that the installed versions of the packages in a lock file are the locked ones.

    python tests/lock_check.py [--warn] tests/requirements-lock.txt

Exit 0 and one summary line when every locked package that is installed has its locked version;
exit 1 and one line per difference otherwise (--warn: the same lines as warnings, exit 0, for a venv
reused on purpose, such as tests/newest_versions.sh's). A locked package that is not installed is fine (the lock
also covers the benchmarks' extra packages). Used by .ci/run, so that a reused or hand-edited venv cannot
pass as the locked environment.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def locked_versions(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if len(pins) != 1:
            raise SystemExit(f"error: {path} line {n}: {line!r} is not an exact pin (name==version)")
        out[canonicalize_name(req.name)] = pins[0]
    return out


def differences(locked: dict[str, str]) -> list[str]:
    out = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        want = locked.get(name)
        # A local build label (torch's "+cpu") is the same release: pip's == ignores it too.
        if want is not None and dist.version.split("+")[0] != want:
            out.append(f"{name}: installed {dist.version}, locked {want}")
    return sorted(out)


def main(argv: list[str]) -> int:
    warn = argv[:1] == ["--warn"]
    argv = argv[1:] if warn else argv
    if len(argv) != 1:
        print("usage: " + __doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(argv[0])
    locked = locked_versions(path)
    diff = differences(locked)
    word = "warning" if warn else "error"
    for line in diff:
        print(f"{word}: {line}", file=sys.stderr)
    if diff:
        print(f"{word}: {len(diff)} package(s) differ from {path}; reinstall with "
              f"`pip install -c {path} -e \".[test]\"`, or update the lock (tests/newest_versions.sh)", file=sys.stderr)
        return 0 if warn else 1
    print(f"lock: every installed package of {path} has its locked version ({len(locked)} locked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
