"""A short coverage-guided run of every atheris target (``tests/fuzz/atheris_targets.py``):
each starts from its seeds and must finish its runs with no crash, no hang and no
undeclared exception. Long runs: ``bash scripts/fuzz.sh TARGET SECONDS``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.atheris_targets import TARGETS, seeds

ROOT = Path(__file__).resolve().parents[2]
RUNS = 2000


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_survives_a_short_run(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds(target)):
        (corpus / f"seed{i}").write_bytes(data)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.atheris_main",
            target,
            f"-runs={RUNS}",
            "-seed=1",
            "-max_len=65536",
            "-timeout=10",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    done = re.search(r"stat::number_of_executed_units:\s+(\d+)", out)
    assert done is not None and int(done.group(1)) >= RUNS, out[-2000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
