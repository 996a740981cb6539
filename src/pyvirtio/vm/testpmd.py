"""DPDK ``testpmd`` as a real network peer: a vhost-user front-end or back-end.

:class:`Testpmd` starts ``dpdk-testpmd`` (Debian package ``dpdk-dev`` with the
``librte-net-vhost23``/``librte-net-virtio23`` PMDs; ``scripts/install-deps.sh``
installs them) with one virtual device and drives its interactive command line over
stdin (``-i``): ``start``/``stop`` forwarding, ``clear port stats all``, and
``show port stats all`` parsed into :class:`PortStats`.

The virtual devices (:func:`vhost_vdev`, :func:`virtio_user_vdev`):

- ``net_vhost0,iface=SOCK,queues=1``: testpmd is a vhost-user *back-end* listening at
  SOCK (for pyvirtio's front-end and :class:`~pyvirtio.drivers.net.NetDriver`);
- ``net_virtio_user0,mac=...,path=SOCK,queues=1[,packed_vq=1][,in_order=1]
  [,mrg_rxbuf=0]``: testpmd is a vhost-user *front-end* with DPDK's virtio PMD,
  connecting to a back-end at SOCK (pyvirtio's ``serve net``); it runs the control
  queue itself.

How it runs on these machines (no hugepages, no PCI devices)::

    stdbuf -o0 -e0 dpdk-testpmd --no-huge -m 512 --no-pci --file-prefix P
        --lcores 0@A,1@B --vdev VDEV -- -i --nb-cores=1 --total-num-mbufs=16384
        --forward-mode=MODE [--txpkts=64]

- ``--no-huge`` backs DPDK's memory by a memfd, which virtio_user shares with its
  back-end (the default mbuf pool does not fit in 512 MiB: 16384 mbufs do).
  ``--in-memory`` cannot be added (``--no-huge`` implies ``--legacy-mem``, which
  it refuses); a distinct ``--file-prefix`` keeps processes apart under
  ``/var/run/dpdk``;
- two lcores are needed (the main one runs the command line, lcore 1 forwards);
  ``--lcores 0@A,1@B`` puts them on CPUs A and B, so two testpmd processes can
  forward on different CPUs;
- ``stdbuf -o0``: testpmd writes with stdio, fully buffered on a pipe; unbuffered,
  each command's output arrives before the next ``testpmd>`` prompt.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from pyvirtio.errors import ConfigurationError

__all__ = [
    "PROMPT",
    "TESTPMD",
    "PortStats",
    "Testpmd",
    "TestpmdError",
    "find_testpmd",
    "parse_port_stats",
    "vhost_vdev",
    "virtio_user_vdev",
]

#: The binary's name (Debian 12: package ``dpdk-dev``).
TESTPMD = "dpdk-testpmd"
#: testpmd's interactive prompt.
PROMPT = "testpmd> "
#: mbufs in testpmd's pool: enough for a port or two, small enough for ``-m 512``.
DEFAULT_MBUFS = 16384


class TestpmdError(ConfigurationError):
    """testpmd could not be started, exited, or did not answer in time."""


def find_testpmd() -> str | None:
    """The path of ``dpdk-testpmd``, or None if it is not installed."""
    return shutil.which(TESTPMD)


def vhost_vdev(sock: str | os.PathLike[str], *, queues: int = 1, index: int = 0) -> str:
    """``net_vhostN``: testpmd as a vhost-user back-end listening at ``sock``."""
    return f"net_vhost{index},iface={os.fspath(sock)},queues={queues}"


def virtio_user_vdev(
    sock: str | os.PathLike[str],
    *,
    mac: str = "00:01:02:03:04:05",
    queues: int = 1,
    packed: bool = False,
    in_order: bool | None = None,
    mrg_rxbuf: bool | None = None,
    queue_size: int | None = None,
    index: int = 0,
) -> str:
    """``net_virtio_userN``: testpmd as a vhost-user front-end connecting to ``sock``
    (``packed_vq``, ``in_order``, ``mrg_rxbuf`` and ``queue_size`` are virtio_user's
    device arguments; None leaves DPDK's default, which for ``in_order`` and
    ``mrg_rxbuf`` is on)."""
    parts = [f"net_virtio_user{index}", f"mac={mac}", f"path={os.fspath(sock)}"]
    parts.append(f"queues={queues}")
    if packed:
        parts.append("packed_vq=1")
    if in_order is not None:
        parts.append(f"in_order={int(in_order)}")
    if mrg_rxbuf is not None:
        parts.append(f"mrg_rxbuf={int(mrg_rxbuf)}")
    if queue_size is not None:
        parts.append(f"queue_size={queue_size}")
    return ",".join(parts)


@dataclass(frozen=True)
class PortStats:
    """One port's counters from ``show port stats all`` ("NIC statistics")."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+(.*?)#{20,}", re.S)
_FIELD = re.compile(
    r"(RX-packets|RX-missed|RX-bytes|RX-errors|RX-nombuf|TX-packets|TX-errors|TX-bytes):\s*(\d+)"
)


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Port number -> :class:`PortStats` for every block in ``text`` (the output of
    ``show port stats all``); the last block of a port wins."""
    out: dict[int, PortStats] = {}
    for m in _BLOCK.finditer(text):
        fields = {k.lower().replace("-", "_"): int(v) for k, v in _FIELD.findall(m.group(2))}
        port = int(m.group(1))
        try:
            out[port] = PortStats(port=port, **fields)
        except TypeError as e:
            raise TestpmdError(f"unexpected port statistics block: {m.group(0)!r}") from e
    return out


class Testpmd:
    """One ``dpdk-testpmd`` process in interactive mode (see the module docs).

    ``vdevs`` are ``--vdev`` arguments; ``prefix`` is its ``--file-prefix`` (distinct
    per process); ``cpus`` the CPUs of the main and the forwarding lcore;
    ``forward_mode`` one of testpmd's (``io``, ``macswap``, ``txonly``, ``rxonly``,
    ...); ``txpkts`` the frame length of ``txonly``; ``extra`` more testpmd (not EAL)
    options. The output goes to ``log`` as well, if given. Use as a context manager,
    or call :meth:`start` and :meth:`close`.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        vdevs: Sequence[str],
        *,
        prefix: str,
        cpus: tuple[int, int] = (0, 1),
        forward_mode: str = "io",
        txpkts: int | None = None,
        burst: int | None = None,
        mbufs: int = DEFAULT_MBUFS,
        mem_mb: int = 512,
        extra: Sequence[str] = (),
        log: str | os.PathLike[str] | None = None,
        binary: str | None = None,
    ) -> None:
        exe = binary or find_testpmd()
        if exe is None:
            raise TestpmdError(f"{TESTPMD} not found (Debian 12: apt-get install dpdk-dev)")
        eal = [
            "--no-huge",
            "-m",
            str(mem_mb),
            "--no-pci",
            "--file-prefix",
            prefix,
            "--lcores",
            f"0@{cpus[0]},1@{cpus[1]}",
        ]
        for v in vdevs:
            eal += ["--vdev", v]
        app = ["-i", "--nb-cores=1", f"--total-num-mbufs={mbufs}", f"--forward-mode={forward_mode}"]
        if txpkts is not None:
            app.append(f"--txpkts={txpkts}")
        if burst is not None:
            app.append(f"--burst={burst}")
        app += list(extra)
        stdbuf = shutil.which("stdbuf")
        pre = [stdbuf, "-o0", "-e0"] if stdbuf else []
        #: the full command line
        self.argv: list[str] = [*pre, exe, *eal, "--", *app]
        self.log = Path(log) if log is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: list[str] = []
        self._len = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._logf: IO[str] | None = None

    # -- process -------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Testpmd:
        """Start testpmd and wait for its first prompt (ports configured)."""
        logf = open(self.log, "w") if self.log is not None else None  # noqa: SIM115
        self._logf = logf
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="testpmd-out", daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, timeout, "start")
        except BaseException:
            self.close()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        logf = self._logf
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            text = data.decode(errors="replace")
            if logf is not None and text:
                with contextlib.suppress(ValueError, OSError):
                    logf.write(text)
                    logf.flush()
            with self._cond:
                if text:
                    self._out.append(text)
                    self._len += len(text)
                else:
                    self._out.append("")
                self._cond.notify_all()
            if not data:
                return

    @property
    def output(self) -> str:
        """Everything testpmd printed so far."""
        with self._cond:
            text = "".join(self._out)
            self._out = [text]
            return text

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def _wait_prompt(self, mark: int, timeout: float, what: str) -> str:
        """Output after character ``mark`` up to a new prompt."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output
            tail = text[mark:]
            if tail.endswith(PROMPT):
                return tail[: -len(PROMPT)]
            if not self.alive:
                raise TestpmdError(
                    f"testpmd exited ({self.proc.returncode if self.proc else '?'}) "
                    f"during {what!r}:\n{text[-3000:]}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestpmdError(f"testpmd: no prompt after {what!r}:\n{text[-3000:]}")
            with self._cond:
                if self._len == len(text):
                    self._cond.wait(min(left, 0.2))

    def command(self, line: str, timeout: float = 15.0) -> str:
        """Run one interactive command; its output (without the echo and prompt)."""
        if self.proc is None or self.proc.stdin is None:
            raise TestpmdError("testpmd is not running")
        mark = len(self.output)
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise TestpmdError(f"testpmd: cannot send {line!r}: {e}\n{self.output[-3000:]}") from e
        out = self._wait_prompt(mark, timeout, line)
        if out.startswith(line):
            out = out[len(line) :]
        return out.lstrip("\r\n")

    # -- forwarding and counters --------------------------------------------------

    def start_forwarding(self, tx_first: bool = False) -> None:
        """``start`` (``start tx_first``: send a burst first, for io/mac loops)."""
        self.command("start tx_first" if tx_first else "start")

    def stop_forwarding(self) -> str:
        """``stop``; its forwarding statistics text."""
        return self.command("stop")

    def clear_stats(self) -> None:
        """``clear port stats all``."""
        self.command("clear port stats all")

    def port_stats(self) -> dict[int, PortStats]:
        """``show port stats all``, parsed."""
        text = self.command("show port stats all")
        stats = parse_port_stats(text)
        if not stats:
            raise TestpmdError(f"no port statistics in:\n{text}")
        return stats

    def wait_link_up(self, port: int = 0, timeout: float = 20.0) -> None:
        """Poll ``show port info`` until the link of ``port`` is up (a vhost port:
        the front-end connected and started its rings)."""
        deadline = time.monotonic() + timeout
        while True:
            if "Link status: up" in self.command(f"show port info {port}"):
                return
            if time.monotonic() > deadline:
                raise TestpmdError(f"testpmd: port {port} link still down after {timeout} s")
            time.sleep(0.1)

    # -- shutdown ------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> int | None:
        """``quit`` (ports stopped and closed), then SIGTERM/SIGKILL if it hangs; the
        exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
                proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._logf is not None:
            with contextlib.suppress(OSError):
                self._logf.close()
            self._logf = None
        return proc.returncode

    def __enter__(self) -> Testpmd:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
