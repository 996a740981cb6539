"""Write a target's seed inputs into a corpus directory (if they are not there):
``python -m tests.fuzz.seed_corpus TARGET DIR``."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from tests.fuzz.atheris_targets import TARGETS, seeds


def main() -> None:
    name, where = sys.argv[1], Path(sys.argv[2])
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    where.mkdir(parents=True, exist_ok=True)
    for data in seeds(name):
        (where / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


if __name__ == "__main__":
    main()
