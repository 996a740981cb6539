#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian
# packages for the real peers, a virtualenv with the Python tools), then lint, types
# and pytest. Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/venv.sh
PY=.venv/bin/python
echo "== ruff check"; "$PY" -m ruff check src tests bench
echo "== ruff format --check"; "$PY" -m ruff format --check src tests bench
echo "== mypy --strict src"; "$PY" -m mypy --strict src
echo "== pytest"; "$PY" -m pytest -q -p no:cacheprovider "$@"
