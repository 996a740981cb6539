"""Private network namespaces for guest network tests and the demo.

Every TAP or veth a pyvirtio test or demo uses lives in a network namespace it
created itself (``ip netns add``), gets addresses only there, and goes away with it:
traffic reaches nothing but that namespace. :class:`NetNamespace` makes one with a
unique name, runs commands in it (``ip netns exec``) and deletes it on exit
(deleting a namespace removes the interfaces in it). Needs root (CAP_SYS_ADMIN and
CAP_NET_ADMIN) and ``ip`` from iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pyvirtio.errors import ConfigurationError

__all__ = ["NetNamespace", "netns_available"]


def netns_available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is missing"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


class NetNamespace:
    """A network namespace that exists for the life of a ``with`` block."""

    def __init__(self, prefix: str = "pyvirtio") -> None:
        why = netns_available()
        if why is not None:
            raise ConfigurationError(why)
        self.name = f"{prefix}-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> str:
        """``ip -n NS ARGS``; returns its output, raises on failure."""
        done = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigurationError(f"ip {' '.join(args)} in {self.name}: {done.stderr.strip()}")
        return done.stdout

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace."""
        return subprocess.Popen(self.exec_argv(argv), **kwargs)

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Run Python ``code`` inside the namespace (this interpreter)."""
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def wait_link(self, dev: str, timeout: float = 30.0) -> None:
        """Wait until interface ``dev`` exists in the namespace."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                ["ip", "-n", self.name, "link", "show", dev], capture_output=True, text=True
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ConfigurationError(f"{dev} did not appear in {self.name}")
            time.sleep(0.05)

    def up(self, dev: str, cidr: str | None = None, mtu: int | None = None) -> None:
        """Bring ``dev`` up, optionally with an address and an MTU."""
        if cidr is not None:
            self.ip("addr", "add", cidr, "dev", dev)
        if mtu is not None:
            self.ip("link", "set", dev, "mtu", str(mtu))
        self.ip("link", "set", dev, "up")

    def close(self) -> None:
        """Delete the namespace and every interface in it."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
