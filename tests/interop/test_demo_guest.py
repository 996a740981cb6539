"""The README's main job, ``pyvirtio demo guest``, as a user runs it.

Peers: Linux 7.3 under QEMU 11.1 (the set-up installs them; the demo falls back to
QEMU 7.2 + Linux 6.1 without them) with every pyvirtio device at once: block, network
(a TAP in a namespace the demo makes), entropy, console and balloon (the last two
through QEMU 11.1's generic vhost-user front-end). Every check the demo prints must
hold, and it must end with OK.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtio.vm import TRIXIE_GENERATION
from pyvirtio.vm.netns import netns_available
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

_SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.mark.skipif(netns_available() is not None, reason=str(netns_available()))
def test_main_job_shows_every_device_working() -> None:
    resolve_peers(TRIXIE_GENERATION)  # the set-up must have installed them
    env = dict(os.environ, PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "pyvirtio", "demo", "guest"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "pyvirtio demo guest: OK" in out, out
    checks = [line for line in out.splitlines() if line.startswith("[host] ok") or "FAIL" in line]
    assert not [c for c in checks if "FAIL" in c], out
    for what in ("disk", "pinged", "hwrng", "hvc0", "named port", "balloon", "statistics"):
        assert any(what in c for c in checks), f"no check about {what}:\n{out}"
    drivers = {"virtio_blk", "virtio_net", "virtio_rng", "virtio_console", "virtio_balloon"}
    assert all(f"driver {d}" in out for d in drivers), out
