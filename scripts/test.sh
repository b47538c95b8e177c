#!/usr/bin/env bash
# Runs the suite; pytest's exit 5 (no tests collected) is a failure, never a silent pass.
set -u
PY=${1:-.venv/bin/python}
"$PY" -m pytest -q tests "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
