# shellcheck shell=bash
# Shared by bin/run and bin/test: create .venv and install the project when pyproject.toml changed.
# usage: . bin/_venv.sh EXTRA   (EXTRA is "[demo]" or "[test]"; each has its own .venv/.installed stamp, and
# neither install removes what the other added, so bin/run and bin/test never undo each other)
set -euo pipefail
PYTHON=${PYTHON:-python3}
# A .venv without a working pip (venv failed halfway, e.g. before python3-venv was installed) is made again.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".$1"
  touch "$stamp"
fi
