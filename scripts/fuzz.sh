#!/usr/bin/env bash
# Coverage-guided fuzzing of one target (atheris + libFuzzer) for a while.
#   bash scripts/fuzz.sh TARGET SECONDS [libFuzzer options]
# Targets: tests/fuzz/atheris_targets.py (TARGETS). The corpus grows in
# .fuzz-corpus/TARGET (seeded on first use); crashes land in .fuzz-crashes/.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
shift 2
PY=.venv/bin/python
[ -x "$PY" ] || bash scripts/venv.sh
corpus=.fuzz-corpus/$target
mkdir -p "$corpus" .fuzz-crashes
"$PY" -m tests.fuzz.seed_corpus "$target" "$corpus"
exec "$PY" -m tests.fuzz.atheris_main "$target" -max_total_time="$seconds" \
    -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix=.fuzz-crashes/"$target"- "$@" "$corpus"
