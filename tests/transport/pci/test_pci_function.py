"""The generic PCI function model (transport/pci/function.py) knows nothing of virtio."""

from __future__ import annotations

import subprocess
import sys


def test_generic_function_imports_nothing_virtio_specific() -> None:
    code = (
        "import sys, pyvirtio.transport.pci.function\n"
        "print(' '.join(m for m in sys.modules if m.startswith('pyvirtio.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "pyvirtio.transport.pci.function" in out
    for forbidden in ("pyvirtio.core", "pyvirtio.devices", "pyvirtio.transport.pci.device"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in out), out
