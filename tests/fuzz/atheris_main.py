"""Run one atheris target: ``python -m tests.fuzz.atheris_main TARGET [libFuzzer args]``.

Every pyvirtio module a target can reach is imported under
``atheris.instrument_imports``, so the fuzzer sees coverage of the library's code.
``scripts/fuzz.sh`` wraps this with a corpus directory and a time limit.
"""

from __future__ import annotations

import sys

import atheris

# everything the targets reach, imported (and so instrumented) before fuzzing
with atheris.instrument_imports(include=["pyvirtio"]):
    import pyvirtio.devices.balloon
    import pyvirtio.devices.blk
    import pyvirtio.devices.console
    import pyvirtio.devices.net
    import pyvirtio.devices.rng
    import pyvirtio.testing
    import pyvirtio.transport.mmio.device
    import pyvirtio.transport.pci.device
    import pyvirtio.transport.vfio_user.backend
    import pyvirtio.transport.vfio_user.codec
    import pyvirtio.transport.vhost_user.backend
    import pyvirtio.transport.vhost_user.codec
    import pyvirtio.virtqueue.packed.device
    import pyvirtio.virtqueue.packed.driver
    import pyvirtio.virtqueue.split.device
    import pyvirtio.virtqueue.split.driver  # noqa: F401
from tests.fuzz.atheris_targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer options]; targets: {', '.join(TARGETS)}")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
