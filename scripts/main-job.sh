#!/usr/bin/env bash
# The main job: install what is missing, then show pyvirtio devices at work.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/venv.sh
exec .venv/bin/pyvirtio demo "$@"
