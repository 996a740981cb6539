#!/usr/bin/env python3
"""Bounds of a pyvirtio vhost-user back-end under a flood of malformed requests.

Starts ``pyvirtio serve blk --null 64M`` and, from this process, sends ``--count``
malformed vhost-user messages (default 10^6): unknown request codes, bodies of the
wrong size, out-of-range ring indexes, descriptors where none belong (eventfds the
back-end must close), truncated headers, plus a well-formed GET_FEATURES now and
then to check it still answers. The back-end may answer with an error reply or close
the connection; the script reconnects and goes on.

Printed: the back-end's resident set size and open descriptor count at the start
(after a warm-up of 10,000 messages) and at the end, and their ratio; the goal is
RSS growth under 5 % and the same descriptor count. Run:
``python bench/bounds.py [--count 1000000]``.
"""

from __future__ import annotations

import argparse
import array
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import pyvirtio  # noqa: F401
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyvirtio.transport.vhost_user.codec import encode
from pyvirtio.transport.vhost_user.spec import FrontendRequest as R

HDR = struct.Struct("<III")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    """Open descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def malformed(rnd: random.Random) -> tuple[bytes, int]:
    """One malformed message and how many eventfds to pass with it."""
    kind = rnd.randrange(6)
    if kind == 0:  # unknown request code
        return HDR.pack(rnd.randrange(100, 1 << 32), 1, 0), 0
    if kind == 1:  # a u64 request with a body of the wrong size
        code = rnd.choice([R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_VRING_CALL])
        n = rnd.choice([0, 1, 7, 9, 12])
        return HDR.pack(int(code), 1, n) + bytes(n), 0
    if kind == 2:  # a ring index far out of range
        body = struct.pack("<II", 1000 + rnd.randrange(1000), 64)
        return HDR.pack(int(R.SET_VRING_NUM), 1, len(body)) + body, 0
    if kind == 3:  # descriptors where none belong
        return encode(R.GET_FEATURES), rnd.randrange(1, 4)
    if kind == 4:  # a huge announced size (never sent)
        return HDR.pack(int(R.SET_MEM_TABLE), 1, 0xFFFF_FFFF), 0
    return HDR.pack(int(R.GET_FEATURES), 0xFFFF_FFFF, 0), 0  # undefined flags


class Client:
    """A front-end that reconnects whenever the back-end closes the connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.reconnects = 0

    def _connect(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            deadline = time.monotonic() + 10
            while True:
                try:
                    s.connect(self.path)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            s.settimeout(5)
            self.sock = s
        return self.sock

    def drop(self) -> None:
        """Close the connection (the next send reconnects)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.reconnects += 1

    def send(self, data: bytes, nfds: int) -> None:
        """Send ``data`` with ``nfds`` fresh eventfds (closed here afterwards)."""
        s = self._connect()
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([data], anc)
        except OSError:
            self.drop()
        finally:
            for fd in fds:
                os.close(fd)

    def alive(self) -> bool:
        """GET_FEATURES answered (reconnecting first if needed)."""
        for _ in range(3):
            s = self._connect()
            try:
                # drain what earlier error replies left, then ask
                s.setblocking(False)
                try:
                    while s.recv(65536):
                        pass
                except BlockingIOError:
                    pass
                s.setblocking(True)
                s.settimeout(5)
                s.sendall(encode(R.GET_FEATURES))
                reply = s.recv(20)
                if len(reply) >= 12:
                    return True
            except OSError:
                pass
            self.drop()
        return False


def main() -> int:
    """Run the flood and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    args = ap.parse_args()
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bounds-") as tmp:
        path = os.path.join(tmp, "blk.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyvirtio", "serve", "blk", "--socket", path, "--null", "64M"],
            stderr=subprocess.DEVNULL,
        )
        try:
            c = Client(path)
            for _ in range(10_000):
                c.send(*malformed(rnd))
            assert c.alive(), "the back-end stopped answering during the warm-up"
            c.drop()  # both readings with no connection open
            time.sleep(0.5)
            rss0, fds0 = rss_kib(proc.pid), fd_count(proc.pid)
            t0 = time.monotonic()
            for i in range(args.count):
                c.send(*malformed(rnd))
                if i % 50_000 == 49_999 and not c.alive():
                    print(f"the back-end stopped answering after {i + 1} messages")
                    return 1
            assert c.alive()
            c.drop()
            time.sleep(0.5)
            rss1, fds1 = rss_kib(proc.pid), fd_count(proc.pid)
            took = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"pyvirtio serve blk: {args.count} malformed messages in {took:.1f} s "
        f"({args.count / took:.0f}/s), {c.reconnects} reconnections"
    )
    print(f"{'':<22} {'start':>10} {'end':>10} {'end/start':>10}")
    print(f"{'RSS (KiB)':<22} {rss0:>10} {rss1:>10} {rss1 / rss0:>10.3f}")
    print(f"{'open descriptors':<22} {fds0:>10} {fds1:>10} {fds1 / fds0:>10.3f}")
    return 0 if rss1 <= rss0 * 1.05 and fds1 <= fds0 else 1


if __name__ == "__main__":
    sys.exit(main())
