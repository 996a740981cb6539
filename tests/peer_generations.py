"""The two generations of real peers the guest tests run against, resolved for a test
(shared by tests/vm and tests/interop)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyvirtio.errors import ConfigurationError
from pyvirtio.vm import SYSTEM_GENERATION, PeerGeneration, peer_generation
from pyvirtio.vm.initramfs import DEFAULT_BUSYBOX


def resolve_peers(name: str) -> PeerGeneration:
    """The QEMU and guest kernel of generation ``name``.

    The first generation is the system's QEMU and Debian 12's kernel (downloaded the
    first time). The second must have been installed by the set-up: if it was not,
    the test fails saying so (a skipped interop test proves nothing).
    """
    if name == SYSTEM_GENERATION:
        if shutil.which("qemu-system-x86_64") is None or not Path(DEFAULT_BUSYBOX).is_file():
            pytest.skip("qemu-system-x86_64 / busybox-static missing: run scripts/install-deps.sh")
        try:
            return peer_generation(name)
        except ConfigurationError as exc:
            pytest.skip(f"Debian guest kernel unavailable: {exc}")
    if not Path(DEFAULT_BUSYBOX).is_file():
        pytest.fail("busybox-static missing: run scripts/install-deps.sh", pytrace=False)
    try:
        return peer_generation(name)
    except ConfigurationError as exc:
        missing = str(exc)
    pytest.fail(f"{name} peers are not set up: {missing}", pytrace=False)
