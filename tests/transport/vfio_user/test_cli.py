"""``pyvirtio serve DEVICE --vfio-user SOCK``: arguments, and a real process served to
the test client and stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvirtio.cli.main import build_parser
from pyvirtio.cli.serve import _check_connection
from pyvirtio.drivers.rng import RngDriver
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.pci.driver import open_virtio_pci
from pyvirtio.transport.pci.enumerate import enumerate_pci
from tests.transport.vfio_user.client import BDF, VfioUserBus

_SRC = str(Path(__file__).resolve().parents[3] / "src")


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "rng", "--vfio-user", "/tmp/a", "--socket", "/tmp/b"],
        ["serve", "rng", "--vfio-user", "/tmp/a", "--connect"],
        ["serve", "rng", "--socket", "/tmp/b", "--pci-mode", "legacy"],
        ["serve", "rng"],
    ],
)
def test_connection_arguments_are_checked(argv: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        _check_connection(build_parser().parse_args(argv))


def test_vfio_user_arguments_accepted() -> None:
    args = build_parser().parse_args(
        ["serve", "blk", "--vfio-user", "/tmp/a", "--null", "1M", "--pci-mode", "transitional"]
    )
    _check_connection(args)
    assert args.vfio_user == "/tmp/a" and args.pci_mode == "transitional"


def test_serve_rng_over_vfio_user_process(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    env = dict(os.environ, PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtio", "serve", "rng", "--vfio-user", str(sock), "-v"],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with VfioUserBus(str(sock)) as bus:
            enumerate_pci(bus, route_interrupts=False)
            t = open_virtio_pci(bus, BDF)
            drv = RngDriver(t)
            drv.initialize()
            assert len(drv.read(16, timeout=5)) == 16
            drv.close()
            t.close()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"connection ended" in err and b"0 refused" in err, err
    assert not sock.exists()
