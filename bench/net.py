#!/usr/bin/env python3
"""vhost-user net: pyvirtio's back-end and driver beside DPDK's, against testpmd.

Reference peer: DPDK 22.11 ``dpdk-testpmd`` (Debian 12 ``dpdk-dev``), started by
:class:`pyvirtio.vm.testpmd.Testpmd` without hugepages, one forwarding core each.
Frames of 64 bytes (reported in Mpps) and 1500 bytes (Gbit/s of frame bytes), each
case measured for ``--seconds`` after a short warm-up, all in the same run:

1. testpmd ``net_virtio_user`` in ``txonly`` (DPDK's virtio PMD sends as fast as the
   back-end takes frames) into

   - pyvirtio: ``python -m pyvirtio serve net --switch --no-mrg-rxbuf
     --trust-frontend`` - a switch with no other port floods each frame to nobody,
     so the host side costs next to nothing;
   - DPDK: a second testpmd with ``net_vhost`` in ``rxonly``.

   Rate: testpmd's TX counter (frames the back-end took).
2. testpmd ``net_virtio_user`` in ``rxonly``, fed by

   - pyvirtio: ``serve net --socket-peer dgram:...`` with a separate Python process
     writing frames into the socket as fast as it can (blocking sends: nothing is
     dropped on the way); the source is part of what is measured;
   - DPDK: ``net_vhost`` in ``txonly``.

   Rate: testpmd's RX counter.
3. Against testpmd ``net_vhost`` (DPDK's vhost library as the back-end):

   - pyvirtio's :class:`~pyvirtio.drivers.net.NetDriver` over
     :class:`~pyvirtio.transport.vhost_user.frontend.VhostUserFrontend` sending
     (net_vhost ``rxonly``; rate: its RX counter) and receiving (net_vhost
     ``txonly``; rate: frames the driver got), in this process;
   - DPDK: testpmd ``net_virtio_user`` doing the same (cases 1 and 2's DPDK rows).

Printed: a table with the rates and the ratio pyvirtio / DPDK per case, then a
cProfile top-10 of pyvirtio's back-end under case 1 at 64 bytes (where its time
goes; a separate run, since the profiler slows it down). ``--plot PATH``
(default ``docs/bench-net.png``) draws the ratios if matplotlib is installed.
Run with ``python bench/net.py [--seconds 3]``; the whole run takes about two
minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

try:
    import pyvirtio  # noqa: F401
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyvirtio.core.driver import RingOptions
from pyvirtio.drivers.net import NetDriver
from pyvirtio.spec.net import NetFeature
from pyvirtio.transport.vhost_user.frontend import connect
from pyvirtio.vm.testpmd import Testpmd, find_testpmd, vhost_vdev, virtio_user_vdev

SIZES = (64, 1500)
WARMUP = 0.5
MAC = "00:01:02:03:04:05"
#: CPUs of the main and the forwarding lcore of the two testpmd processes
CPUS_A = (0, 1)
CPUS_B = (1, 0)


@dataclass
class Rate:
    """Frames in an interval."""

    frames: int
    seconds: float
    size: int

    @property
    def mpps(self) -> float:
        """Millions of frames per second."""
        return self.frames / self.seconds / 1e6

    @property
    def gbps(self) -> float:
        """Gigabits of frame bytes per second."""
        return self.frames * self.size * 8 / self.seconds / 1e9

    def show(self) -> str:
        """The figure reported for this size."""
        return f"{self.mpps:.4f} Mpps" if self.size == 64 else f"{self.gbps:.4f} Gbit/s"

    def value(self) -> float:
        """Mpps at 64 bytes, Gbit/s otherwise."""
        return self.mpps if self.size == 64 else self.gbps


def measure(counter: Callable[[], int], seconds: float, size: int) -> Rate:
    """Rate of ``counter`` over ``seconds`` after a warm-up."""
    time.sleep(WARMUP)
    c0, t0 = counter(), time.perf_counter()
    time.sleep(seconds)
    c1, t1 = counter(), time.perf_counter()
    return Rate(c1 - c0, t1 - t0, size)


class NetDpdk(NetDriver):
    """NetDriver without VIRTIO_NET_F_MTU (DPDK's vhost back-end has no config space)."""

    def specific_features(self, offered: int) -> int:
        """What NetDriver takes, less VIRTIO_NET_F_MTU."""
        return super().specific_features(offered) & ~NetFeature.MTU.mask


@contextlib.contextmanager
def serve(argv: list[str], sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``pyvirtio serve net`` process, stopped with SIGTERM after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve net did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_argv(sock: Path, *host: str, profile: Path | None = None) -> list[str]:
    pre = [sys.executable]
    if profile is not None:
        pre += ["-m", "cProfile", "-o", str(profile)]
    return [*pre, "-m", "pyvirtio", "serve", "net", "--socket", str(sock), *host,
            "--no-mrg-rxbuf", "--trust-frontend"]  # fmt: skip


def tp(d: Path, name: str, vdev: str, mode: str, size: int, cpus: tuple[int, int]) -> Testpmd:
    """A started testpmd."""
    return Testpmd(
        [vdev], prefix=f"bench-{name}-{os.getpid()}", forward_mode=mode, txpkts=size,
        cpus=cpus, log=d / f"{name}.log",
    ).start()  # fmt: skip


def virtio_user_tx_into_ours(d: Path, size: int, seconds: float, profile: Path | None) -> Rate:
    """Case 1, pyvirtio: testpmd virtio_user txonly into ``serve net --switch``."""
    sock = d / "ours.sock"
    with serve(_serve_argv(sock, "--switch", profile=profile), sock, d / "serve.log"):
        t = tp(d, "vu", virtio_user_vdev(sock, mac=MAC), "txonly", size, CPUS_A)
        try:
            t.start_forwarding()
            r = measure(lambda: t.port_stats()[0].tx_packets, seconds, size)
            t.stop_forwarding()
        finally:
            t.close()
    return r


def virtio_user_tx_into_dpdk(d: Path, size: int, seconds: float) -> Rate:
    """Case 1, DPDK: testpmd virtio_user txonly into testpmd net_vhost rxonly."""
    sock = d / "vhost.sock"
    v = tp(d, "vh", vhost_vdev(sock), "rxonly", size, CPUS_B)
    try:
        v.start_forwarding()
        t = tp(d, "vu", virtio_user_vdev(sock, mac=MAC), "txonly", size, CPUS_A)
        try:
            t.start_forwarding()
            r = measure(lambda: t.port_stats()[0].tx_packets, seconds, size)
            t.stop_forwarding()
        finally:
            t.close()
    finally:
        v.close()
    return r


_SOURCE = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1]); s.connect(sys.argv[2])
f = bytes.fromhex("000102030405020000000001") + b"\\x08\\x00" + bytes(int(sys.argv[3]) - 14)
send = s.send
while True:
    send(f)
"""


def virtio_user_rx_from_ours(d: Path, size: int, seconds: float) -> Rate:
    """Case 2, pyvirtio: a socket source through ``serve net`` into virtio_user rxonly."""
    sock, local, remote = d / "ours.sock", d / "dev.dgram", d / "src.dgram"
    argv = _serve_argv(sock, "--socket-peer", f"dgram:{local},{remote}")
    with serve(argv, sock, d / "serve.log"):
        t = tp(d, "vu", virtio_user_vdev(sock, mac=MAC), "rxonly", size, CPUS_A)
        src = subprocess.Popen([sys.executable, "-c", _SOURCE, str(remote), str(local), str(size)])
        try:
            t.start_forwarding()
            r = measure(lambda: t.port_stats()[0].rx_packets, seconds, size)
            t.stop_forwarding()
        finally:
            src.kill()
            src.wait()
            t.close()
            with contextlib.suppress(OSError):
                remote.unlink()
    return r


def virtio_user_rx_from_dpdk(d: Path, size: int, seconds: float) -> Rate:
    """Case 2, DPDK: net_vhost txonly into virtio_user rxonly."""
    sock = d / "vhost.sock"
    v = tp(d, "vh", vhost_vdev(sock), "txonly", size, CPUS_B)
    try:
        t = tp(d, "vu", virtio_user_vdev(sock, mac=MAC), "rxonly", size, CPUS_A)
        try:
            t.start_forwarding()
            v.start_forwarding()
            r = measure(lambda: t.port_stats()[0].rx_packets, seconds, size)
            v.stop_forwarding()
        finally:
            t.close()
    finally:
        v.close()
    return r


def _driver(sock: Path) -> NetDriver:
    return connect(
        NetDpdk, sock, connect_timeout=20, mem_size=64 << 20, ctrl_vq=False, mrg_rxbuf=False,
        ring=RingOptions(packed=False),
    )  # fmt: skip


def driver_tx_into_dpdk(d: Path, size: int, seconds: float) -> Rate:
    """Case 3: NetDriver sending into net_vhost rxonly."""
    sock = d / "vhost.sock"
    v = tp(d, "vh", vhost_vdev(sock), "rxonly", size, CPUS_B)
    try:
        v.start_forwarding()
        drv = _driver(sock)
        try:
            frame = bytes.fromhex("020000000002") + drv.mac + b"\x08\x00" + bytes(size - 14)
            end = time.perf_counter() + WARMUP + seconds + 0.5
            t0 = c0 = None
            while time.perf_counter() < end:
                for _ in range(256):
                    if not drv.try_send(frame):
                        drv.service()
                if t0 is None and time.perf_counter() > end - seconds - 0.5:
                    t0, c0 = time.perf_counter(), v.port_stats()[0].rx_packets
            assert t0 is not None and c0 is not None
            r = Rate(v.port_stats()[0].rx_packets - c0, time.perf_counter() - t0, size)
        finally:
            drv.close()
            drv.transport.close()
    finally:
        v.close()
    return r


def driver_rx_from_dpdk(d: Path, size: int, seconds: float) -> Rate:
    """Case 3: net_vhost txonly into NetDriver."""
    sock = d / "vhost.sock"
    v = tp(d, "vh", vhost_vdev(sock), "txonly", size, CPUS_B)
    try:
        drv = _driver(sock)
        try:
            v.start_forwarding()
            end = time.perf_counter() + WARMUP
            while time.perf_counter() < end:
                drv.poll(0.001)
                drv._ready.clear()
            n = 0
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                while drv.try_recv() is not None:
                    n += 1
            r = Rate(n, time.perf_counter() - t0, size)
            v.stop_forwarding()
        finally:
            drv.close()
            drv.transport.close()
    finally:
        v.close()
    return r


def profile_top(path: Path, n: int = 10) -> str:
    """The ``n`` functions with the most own time in a cProfile dump."""
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    return text[text.find("   ncalls") :] if "   ncalls" in text else text


def plot(rows: list[tuple[str, int, Rate, Rate]], path: Path) -> bool:
    """A bar chart of the ratios; False if matplotlib is missing."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    labels = [f"{name}, {size} B" for name, size, _, _ in rows]
    ratios = [p.value() / r.value() if r.value() else 0.0 for _, _, p, r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, ratios)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(0.2, color="tab:red", linestyle="--", label="goal: 0.2x DPDK at 64 B")
    ax.set_xlabel("pyvirtio / DPDK (same run)")
    ax.set_title("vhost-user net against DPDK 22.11 testpmd (one core each)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run every case and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=2.0, help="measurement time per case")
    ap.add_argument("--plot", type=Path, default=Path("docs/bench-net.png"))
    args = ap.parse_args(argv)
    if find_testpmd() is None:
        print("error: dpdk-testpmd not found (scripts/install-deps.sh)", file=sys.stderr)
        return 2
    s = args.seconds
    print(f"reference: DPDK 22.11 dpdk-testpmd; {s:g} s per case, one forwarding core")
    rows: list[tuple[str, int, Rate, Rate]] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-net-") as tmp:
        d = Path(tmp)
        prof = d / "serve.prof"
        for size in SIZES:
            cases: list[tuple[str, Callable[[], Rate], Callable[[], Rate]]] = [
                (
                    "virtio_user txonly -> back-end",
                    partial(virtio_user_tx_into_ours, d, size, s, None),
                    partial(virtio_user_tx_into_dpdk, d, size, s),
                ),
                (
                    "back-end -> virtio_user rxonly",
                    partial(virtio_user_rx_from_ours, d, size, s),
                    partial(virtio_user_rx_from_dpdk, d, size, s),
                ),
                (
                    "driver tx -> net_vhost rxonly",
                    partial(driver_tx_into_dpdk, d, size, s),
                    partial(virtio_user_tx_into_dpdk, d, size, s),
                ),
                (
                    "net_vhost txonly -> driver rx",
                    partial(driver_rx_from_dpdk, d, size, s),
                    partial(virtio_user_rx_from_dpdk, d, size, s),
                ),
            ]
            for name, ours, ref in cases:
                p, r = ours(), ref()
                rows.append((name, size, p, r))
                print(f"  {name:<32}{size:>5} B  pyvirtio {p.show():>18}   DPDK {r.show():>18}",
                      flush=True)  # fmt: skip
        # where the back-end's time goes: the same case once more, under cProfile
        # (not in the figures above: the profiler slows it down about threefold)
        virtio_user_tx_into_ours(d, 64, s, prof)
        top = profile_top(prof) if prof.exists() else "(no profile written)"
    print()
    head = f"{'case':<34}{'size':>6}{'pyvirtio':>18}{'DPDK':>18}{'ratio':>10}"
    print(head)
    print("-" * len(head))
    for name, size, p, r in rows:
        ratio = p.value() / r.value() if r.value() else float("nan")
        print(f"{name:<34}{size:>5}B{p.show():>18}{r.show():>18}{ratio:>10.4f}")
    print("\npyvirtio back-end, virtio_user txonly 64 B, cProfile top 10 by own time:")
    print(top)
    if plot(rows, args.plot):
        print(f"plot: {args.plot}")
    else:
        print("plot: matplotlib not installed, none drawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
