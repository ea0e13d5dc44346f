# Shared by bin/run and bin/test: create .venv and install the project when pyproject.toml changed.
# usage: . bin/_venv.sh EXTRA   (EXTRA is "" or "[test]")
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.installed$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".$1"
  touch "$stamp"
fi
