#!/usr/bin/env python3
"""Virtqueue round trips per second: split and packed rings, one and two processes.

A round trip is one buffer (1 device-readable + 1 device-writable segment of 64 bytes
each) going driver -> device -> driver:
``add`` + ``kick_prepare`` + ``pop`` + ``push`` + ``flush`` + ``get_used``.
With batch 32, 32 buffers are added before one ``kick_prepare`` and one ``flush``.

- one process: the driver queue and the device queue share one ``GuestMemory`` in
  one thread; no notifications are sent.
- two processes: the device queue runs in a child process that maps the same memfd
  guest memory (the fd is passed to it), woken by a kick eventfd; it answers through
  a call eventfd. Both sides honour notification suppression (VIRTIO_F_EVENT_IDX by
  default), so a batch costs one kick and one call.

Reference peer, measured in the same run across the same process boundary:
- one process: a ``queue.Queue`` request/response ping-pong of 64-byte messages in
  one thread (put + get on a request queue, put + get on a response queue);
- two processes: an ``os.pipe`` ping-pong with a child process echoing 64-byte
  messages: one ``os.write`` per message; the child echoes whatever it has read in
  one write, and the parent reads until the whole batch is back.

The ratio column is ring round trips/s divided by the reference's. Run with
``python bench/virtqueue.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import pyvirtio  # noqa: F401
except ImportError:  # pragma: no cover - running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion
from pyvirtio.spec.features import Feature
from pyvirtio.virtqueue import make_device_queue, make_driver_queue
from pyvirtio.virtqueue.common import DeviceVirtqueue, DriverVirtqueue, QueueAddresses

MEM_SIZE = 4 << 20
#: guest address of the "stop" byte the parent sets to end the device child
STOP_ADDR = 0
ALLOC_BASE = 0x1000
QUEUE_SIZE = 256
SEG = 64
ONE = (1).to_bytes(8, "little")
#: poll timeout (ms): a safety net only, so a lost wake-up can never hang the bench
POLL_MS = 100


@dataclass
class Result:
    """One measured case."""

    label: str
    procs: int
    batch: int
    round_trips: int
    seconds: float

    @property
    def rate(self) -> float:
        """Round trips per second."""
        return self.round_trips / self.seconds if self.seconds > 0 else 0.0


def ring_features(fmt: str, event_idx: bool, in_order: bool, indirect: bool) -> int:
    """The negotiated feature set both sides of the benchmark queue use."""
    f = Feature.VERSION_1.mask
    if fmt == "packed":
        f |= Feature.RING_PACKED.mask
    if event_idx:
        f |= Feature.EVENT_IDX.mask
    if in_order:
        f |= Feature.IN_ORDER.mask
    if indirect:
        f |= Feature.INDIRECT_DESC.mask
    return f


def make_buffers(alloc: GuestAllocator, batch: int) -> list[tuple[int, int]]:
    """``batch`` pairs of (device-readable, device-writable) 64-byte buffers."""
    return [(alloc.alloc(SEG, 64), alloc.alloc(SEG, 64)) for _ in range(batch)]


def measure(
    label: str, procs: int, batch: int, seconds: float, one_round: Callable[[], None]
) -> Result:
    """Run ``one_round`` (``batch`` round trips) again and again for ``seconds``."""
    clock = time.perf_counter
    done = 0
    start = clock()
    end = start + seconds
    while True:
        one_round()
        done += batch
        now = clock()
        if now >= end:
            break
    return Result(label, procs, batch, done, now - start)


# -- one process ---------------------------------------------------------------------


def bench_one_process(fmt: str, features: int, batch: int, seconds: float) -> Result:
    """Driver and device queue over one GuestMemory, in one thread."""
    mem = GuestMemory.create(MEM_SIZE)
    try:
        alloc = GuestAllocator(ALLOC_BASE, MEM_SIZE - ALLOC_BASE)
        drv: DriverVirtqueue[int] = make_driver_queue(mem, alloc, QUEUE_SIZE, features)
        dev: DeviceVirtqueue = make_device_queue(mem, QUEUE_SIZE, drv.addrs, features)
        bufs = make_buffers(alloc, batch)
        segs = [(((r, SEG),), ((w, SEG),)) for r, w in bufs]
        add, kick_prepare, get_used = drv.add, drv.kick_prepare, drv.get_used
        pop, push, flush = dev.pop, dev.push, dev.flush

        def one_round() -> None:
            for i, (out, in_) in enumerate(segs):
                add(out, in_, i)
            kick_prepare()
            while (chain := pop()) is not None:
                push(chain, SEG)
            flush()
            got = 0
            while get_used() is not None:
                got += 1
            if got != batch:
                raise RuntimeError(f"{fmt}: {got} of {batch} buffers came back")

        return measure(fmt, 1, batch, seconds, one_round)
    finally:
        mem.close()


def bench_queue_reference(batch: int, seconds: float) -> Result:
    """Reference: queue.Queue request/response ping-pong in one thread."""
    req: queue.Queue[bytes] = queue.Queue()
    resp: queue.Queue[bytes] = queue.Queue()
    msgs = [bytes([i]) * SEG for i in range(batch)]

    def one_round() -> None:
        for m in msgs:
            req.put(m)
        for _ in range(batch):
            resp.put(req.get())
        for _ in range(batch):
            resp.get()

    return measure("reference: queue.Queue", 1, batch, seconds, one_round)


# -- two processes -------------------------------------------------------------------


def _child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"benchmark child failed to start (said {line!r})")


def _end_child(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a child told to stop (killing it after 5 s), then close its pipe."""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _eventfd_wait(poller: select.poll, fd: int) -> bool:
    """Wait for ``fd`` (non-blocking eventfd) with a safety timeout, then drain it.

    Returns False if the wait timed out.
    """
    if not poller.poll(POLL_MS):
        return False
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 8)
    return True


def bench_two_process(fmt: str, features: int, batch: int, seconds: float) -> Result:
    """Driver queue here, device queue in a child process over the same memfd."""
    mem = GuestMemory.create(MEM_SIZE)
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    proc: subprocess.Popen[bytes] | None = None
    try:
        alloc = GuestAllocator(ALLOC_BASE, MEM_SIZE - ALLOC_BASE)
        drv: DriverVirtqueue[int] = make_driver_queue(mem, alloc, QUEUE_SIZE, features)
        a = drv.addrs
        memfd = mem.regions[0].fd
        proc = subprocess.Popen(
            _child_cmd(
                "--child-device",
                *map(str, (memfd, MEM_SIZE, kick_fd, call_fd, QUEUE_SIZE, features)),
                *map(str, (a.desc, a.driver, a.device)),
            ),
            pass_fds=(memfd, kick_fd, call_fd),
            stdout=subprocess.PIPE,
            env=_child_env(),
        )
        _wait_ready(proc)
        bufs = make_buffers(alloc, batch)
        segs = [(((r, SEG),), ((w, SEG),)) for r, w in bufs]
        poller = select.poll()
        poller.register(call_fd, select.POLLIN)
        add, kick_prepare, get_used = drv.add, drv.kick_prepare, drv.get_used
        enable_interrupts = drv.enable_interrupts
        child = proc

        def one_round() -> None:
            for i, (out, in_) in enumerate(segs):
                add(out, in_, i)
            if kick_prepare():
                os.write(kick_fd, ONE)
            got = 0
            while True:
                while get_used() is not None:
                    got += 1
                if got >= batch:
                    break
                if enable_interrupts():
                    continue
                if not _eventfd_wait(poller, call_fd) and child.poll() is not None:
                    raise RuntimeError("benchmark device child died")

        return measure(fmt, 2, batch, seconds, one_round)
    finally:
        if proc is not None:
            mem.write(STOP_ADDR, b"\x01")
            os.write(kick_fd, ONE)
            _end_child(proc)
        os.close(kick_fd)
        os.close(call_fd)
        mem.close()


def child_device(args: Sequence[str]) -> int:
    """Child side of the two-process ring case: serve the device queue until stopped."""
    memfd, size, kick_fd, call_fd, qsize, features, desc, driver, device = map(int, args)
    mem = GuestMemory([MemoryRegion(guest_phys_addr=0, size=size, fd=memfd, owns_fd=False)])
    vq = make_device_queue(mem, qsize, QueueAddresses(desc, driver, device), features)
    poller = select.poll()
    poller.register(kick_fd, select.POLLIN)
    stop = mem.view(STOP_ADDR, 1)
    pop, push, flush = vq.pop, vq.push, vq.flush
    set_notification, enable_notification = vq.set_notification, vq.enable_notification
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while not stop[0]:
        _eventfd_wait(poller, kick_fd)
        # drain with notifications off, re-enable, re-check (no buffer is missed)
        while True:
            set_notification(False)
            while (chain := pop()) is not None:
                push(chain, SEG)
            if flush():
                os.write(call_fd, ONE)
            if not enable_notification():
                break
    stop.release()
    mem.close()
    return 0


def bench_pipe_reference(batch: int, seconds: float) -> Result:
    """Reference: os.pipe ping-pong of 64-byte messages with a child process."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    proc = subprocess.Popen(
        _child_cmd("--child-echo", str(to_r), str(from_w), str(SEG * batch)),
        pass_fds=(to_r, from_w),
        stdout=subprocess.PIPE,
        env=_child_env(),
    )
    os.close(to_r)
    os.close(from_w)
    try:
        _wait_ready(proc)
        msg = b"\x5a" * SEG
        want = SEG * batch

        def one_round() -> None:
            for _ in range(batch):
                os.write(to_w, msg)
            got = 0
            while got < want:
                chunk = os.read(from_r, want - got)
                if not chunk:
                    raise RuntimeError("echo child died")
                got += len(chunk)

        return measure("reference: os.pipe", 2, batch, seconds, one_round)
    finally:
        os.close(to_w)
        _end_child(proc)
        os.close(from_r)


def child_echo(args: Sequence[str]) -> int:
    """Child side of the pipe reference: echo everything until end of file."""
    rfd, wfd, bufsize = map(int, args)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        data = os.read(rfd, bufsize)
        if not data:
            break
        os.write(wfd, data)
    return 0


# -- main ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run every case and print the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-device"]:
        return child_device(argv[1:])
    if argv[:1] == ["--child-echo"]:
        return child_echo(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each case (2)")
    p.add_argument("--no-event-idx", action="store_true", help="do not use VIRTIO_F_EVENT_IDX")
    p.add_argument("--in-order", action="store_true", help="negotiate VIRTIO_F_IN_ORDER")
    p.add_argument("--indirect", action="store_true", help="negotiate VIRTIO_F_INDIRECT_DESC")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (1,32)")
    ns = p.parse_args(argv)
    seconds: float = ns.seconds
    if seconds <= 0:
        p.error("--seconds must be positive")
    batches = [int(b) for b in str(ns.batches).split(",") if b]
    if any(b <= 0 or b > QUEUE_SIZE // 2 for b in batches):
        p.error(f"batch sizes must be between 1 and {QUEUE_SIZE // 2}")
    event_idx = not ns.no_event_idx
    feats = {
        fmt: ring_features(fmt, event_idx, ns.in_order, ns.indirect) for fmt in ("split", "packed")
    }
    opts = [
        n
        for n, on in (
            ("event_idx", event_idx),
            ("in_order", ns.in_order),
            ("indirect", ns.indirect),
        )
        if on
    ]
    print(
        f"pyvirtio virtqueue round trips ({sys.implementation.name} "
        f"{sys.version.split()[0]}, queue size {QUEUE_SIZE}, 64-byte segments, "
        f"features: {', '.join(opts) or 'none'}, {seconds:g} s per case)"
    )
    refs: dict[tuple[int, int], Result] = {}
    rows: list[Result] = []
    ref_fns: dict[int, Callable[[int, float], Result]] = {
        1: bench_queue_reference,
        2: bench_pipe_reference,
    }
    for procs in (1, 2):
        for batch in batches:
            refs[procs, batch] = ref_fns[procs](batch, seconds)
            for fmt in ("split", "packed"):
                fn = bench_one_process if procs == 1 else bench_two_process
                rows.append(fn(fmt, feats[fmt], batch, seconds))
    head = f"{'ring':<8}{'processes':>10}{'batch':>7}{'round trips/s':>16}"
    head += f"{'reference rt/s':>16}{'ring/ref':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = refs[r.procs, r.batch]
        ratio = r.rate / ref.rate if ref.rate else float("nan")
        print(
            f"{r.label:<8}{r.procs:>10}{r.batch:>7}{r.rate:>16,.0f}{ref.rate:>16,.0f}{ratio:>10.2f}"
        )
    print()
    print("reference peer (same run, same process boundary):")
    for (procs, batch), ref in sorted(refs.items()):
        what = (
            "queue.Queue request/response ping-pong, one thread"
            if procs == 1
            else "os.pipe ping-pong with a child process"
        )
        print(
            f"  {ref.label:<24} processes={procs} batch={batch:<3} "
            f"{ref.rate:>12,.0f} rt/s  ({what})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
