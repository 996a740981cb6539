"""A :class:`~pyvirtio.transport.bus.Bus` that is the CPU of a QEMU process (qtest).

QEMU's qtest protocol lets an outside process stand in for the guest CPU: it sends
text lines (``outl 0xcf8 0x80001000``, ``readl 0xfeb02e00``, ...) over a socket and
gets ``OK [value]`` back. :class:`QtestBus` listens on a unix socket first and starts
``qemu-system-x86_64 -qtest unix:SOCK`` (Debian's QEMU has no ``-accel qtest``).

The virtual CPU must never run firmware that touches the devices, yet some devices
only work while the VM is *running* (QEMU's virtio-rng drops entropy while the VM
is stopped, e.g. under ``-S``). So by default the VM runs, with a 64 KiB firmware
image made of ``HLT`` instructions only (``-bios``): the CPU halts at its reset
vector, and the machine's PIT is switched off (``pit=off``) so that no timer
interrupt chatters on the intercepted I/O APIC. ``running=False`` uses ``-S``
instead (the VM stays paused; virtio-blk works, virtio-rng does not).

Guest RAM is a memfd of ours handed to QEMU as a shared file backend
(``memory-backend-file,mem-path=/proc/self/fd/N,share=on`` bound with
``-machine memory-backend=``), and mapped here too: :attr:`QtestBus.mem` is a
zero-copy :class:`~pyvirtio.memory.guest_memory.GuestMemory` on QEMU's own RAM,
so rings and buffers never travel over the socket. Below 4 GiB the RAM is
identity-mapped (guest-physical address = offset in the backend) on ``pc``, ``q35``
and ``microvm`` as long as it is smaller than the PCI hole; :data:`MAX_MEM_SIZE` keeps
it so.

Interrupts:

- INTx / GSI lines: ``irq_intercept_in <ioapic>`` makes QEMU report the I/O APIC's
  input lines as asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines on the socket;
  a raise becomes ``Interrupt("intx", line=N)``.
- MSI / MSI-X: a message QEMU sends is a plain memory write by the device. There is
  no CPU and no local APIC to observe it at 0xFEE00000, so a driver points its MSI-X
  table at a page of guest RAM instead (:attr:`QtestBus.msi_window`, as QEMU's own
  libqos tests do); the bus watches that page and reports each non-zero word as
  ``Interrupt("msi", address=..., data=...)``, then clears it. A driver must
  therefore never use data 0. Memory writes wake no file descriptor: the first call
  of :meth:`QtestBus.interrupt_fds` (an event loop wants to wait) starts a small
  watcher thread that looks at the window every millisecond and signals an eventfd.

Allocation: :attr:`QtestBus.allocator` hands out RAM from 1 MiB + 4 KiB upwards
(the low 1 MiB holds legacy ROM/VGA windows, the next page is the MSI window).

QEMU never outlives the bus: :meth:`QtestBus.close` stops it (SIGTERM, then SIGKILL),
a finalizer does the same if the bus is dropped, and the child gets
``PR_SET_PDEATHSIG`` so it dies with the Python process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from pyvirtio.errors import ConfigurationError, VirtioError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion, create_memfd
from pyvirtio.transport.bus import Interrupt

__all__ = [
    "DEFAULT_MEM_SIZE",
    "DEFAULT_QEMU",
    "MAX_MEM_SIZE",
    "MSI_WINDOW_BASE",
    "MSI_WINDOW_SIZE",
    "QtestBus",
    "QtestError",
    "RAM_ALLOC_BASE",
]

DEFAULT_QEMU = "qemu-system-x86_64"
"""The QEMU binary looked up on ``PATH``."""

DEFAULT_MEM_SIZE = 64 << 20
"""Guest RAM unless told otherwise (64 MiB)."""

MAX_MEM_SIZE = 2 << 30
"""Largest guest RAM accepted: it must stay below the PCI hole to be identity-mapped."""

MSI_WINDOW_BASE = 0x100000
"""Guest-physical page MSI-X table entries point at (QtestBus only)."""

MSI_WINDOW_SIZE = 0x1000
"""Size of the MSI window: one 32-bit word per message address."""

RAM_ALLOC_BASE = MSI_WINDOW_BASE + MSI_WINDOW_SIZE
"""First guest-physical address :attr:`QtestBus.allocator` hands out."""

#: default deadline for one qtest command and for QEMU to connect (seconds)
DEFAULT_TIMEOUT = 30.0
#: the I/O APIC whose inputs are intercepted, by machine type
_INTERCEPT = {"pc": "ioapic", "q35": "ioapic", "microvm": "ioapic"}
#: polling the MSI window while waiting: first and largest sleep (seconds)
_POLL_MIN = 0.0001
_POLL_MAX = 0.002
#: how often the watcher thread looks at the MSI window (seconds)
_WATCH_INTERVAL = 0.001
_PR_SET_PDEATHSIG = 1
#: the x86 HLT instruction, and the size of the firmware image made of it
_HLT = b"\xf4"
_FIRMWARE_SIZE = 0x10000
_ZERO_WINDOW = bytes(MSI_WINDOW_SIZE)
_SIZES = {1: "b", 2: "w", 4: "l", 8: "q"}


class QtestError(VirtioError):
    """QEMU failed to start, died, refused a command, or did not answer in time."""


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets ``PR_SET_PDEATHSIG(SIGKILL)``, or None if unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _cleanup(
    proc: subprocess.Popen[bytes], sock: socket.socket, conn: list[socket.socket], tmp: str
) -> None:
    _stop_process(proc)
    for s in conn:
        s.close()
    sock.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _opt(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


class QtestBus:
    """Drive a paused QEMU through qtest; implements :class:`~pyvirtio.transport.bus.Bus`.

    ``args`` are extra QEMU arguments (``-device ...``, ``-drive ...``, ``-global ...``).
    ``machine`` is ``pc``, ``q35`` or ``microvm``, optionally with properties
    (``"microvm,acpi=off"``); microvm gets ``ioapic2=off`` unless ``ioapic2=`` is
    given, so that its 8 virtio-mmio slots interrupt through the first I/O APIC (the
    one intercepted). ``irq_intercept`` names the QOM path whose input
    lines are intercepted (default: the machine's I/O APIC; ``""``: none).
    ``timeout`` bounds QEMU's start-up and each command. ``running=False`` keeps the
    VM paused (``-S``) instead of running it on the halting firmware.

    Raises :class:`QtestError` if QEMU cannot be started or does not connect, and
    :class:`~pyvirtio.errors.ConfigurationError` for a bad argument.
    """

    #: guest RAM (QEMU's RAM, mapped here)
    mem: GuestMemory

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        machine: str = "pc",
        mem_size: int = DEFAULT_MEM_SIZE,
        qemu: str = DEFAULT_QEMU,
        irq_intercept: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        running: bool = True,
    ) -> None:
        machine_type = machine.split(",", 1)[0]
        if machine_type == "microvm" and "ioapic2=" not in machine:
            # keep every virtio-mmio interrupt on the one I/O APIC qtest intercepts
            machine += ",ioapic2=off"
        if running and "pit=" not in machine:
            machine += ",pit=off"
        if machine_type not in _INTERCEPT:
            raise ConfigurationError(
                f"machine {machine_type!r} is not supported (pc, q35 or microvm)"
            )
        page = os.sysconf("SC_PAGE_SIZE")
        if mem_size % (1 << 20) or not RAM_ALLOC_BASE + page <= mem_size <= MAX_MEM_SIZE:
            raise ConfigurationError(
                f"guest RAM must be a whole number of MiB between 2 MiB and "
                f"{MAX_MEM_SIZE >> 20} MiB, not {mem_size} bytes"
            )
        binary = shutil.which(qemu)
        if binary is None:
            raise ConfigurationError(f"{qemu} not found (install qemu-system-x86)")
        #: the machine type (``pc``, ``q35``, ``microvm``)
        self.machine = machine_type
        #: guest-physical ``(base, size)`` of the page MSI-X messages should target
        self.msi_window = (MSI_WINDOW_BASE, MSI_WINDOW_SIZE)
        #: driver memory: everything above the MSI window
        self.allocator = GuestAllocator(RAM_ALLOC_BASE, mem_size - RAM_ALLOC_BASE)
        #: interrupts seen (count by kind, for tests and statistics)
        self.interrupt_counts: dict[str, int] = {"intx": 0, "msi": 0}
        #: levels of intercepted lines as last reported (line -> raised)
        self.irq_levels: dict[int, bool] = {}
        self.timeout = timeout
        self._closed = False
        self._buf = bytearray()
        self._pending: list[Interrupt] = []
        self._efd = -1
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._tmp = tempfile.mkdtemp(prefix="pyvirtio-qtest-")
        self._log_path = Path(self._tmp) / "qemu.log"
        sock_path = os.path.join(self._tmp, "qtest.sock")
        ram_fd = create_memfd(mem_size, "pyvirtio-qtest-ram")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn_holder: list[socket.socket] = []
        try:
            listener.bind(sock_path)
            listener.listen(1)
            argv = [
                binary,
                "-machine",
                f"{machine},memory-backend=pyvirtio-ram",
                "-m",
                f"{mem_size >> 20}M",
                "-object",
                f"memory-backend-file,id=pyvirtio-ram,size={mem_size},"
                f"mem-path=/proc/self/fd/{ram_fd},share=on",
                *(["-bios", self._halt_firmware()] if running else ["-S"]),
                "-display",
                "none",
                "-nodefaults",
                "-qtest",
                f"unix:{_opt(sock_path)}",
                "-qtest-log",
                "/dev/null",
                *args,
            ]
            #: the full QEMU command line
            self.argv = argv
            with open(self._log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(ram_fd,),
                    preexec_fn=_pdeathsig(),
                )
        except BaseException:
            listener.close()
            os.close(ram_fd)
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(
            self, _cleanup, self.proc, listener, self._conn_holder, self._tmp
        )
        try:
            self._sock = self._accept(listener, timeout)
            self._conn_holder.append(self._sock)
            region = MemoryRegion(guest_phys_addr=0, size=mem_size, fd=ram_fd)
            ram_fd = -1
            self.mem = GuestMemory([region])
            self._msi_view = self.mem.view(MSI_WINDOW_BASE, MSI_WINDOW_SIZE)
            self._msi_words = self._msi_view.cast("I")
            if irq_intercept is None:
                irq_intercept = _INTERCEPT[machine_type]
            if irq_intercept:
                self.command(f"irq_intercept_in {irq_intercept}")
        except BaseException:
            if ram_fd >= 0:
                os.close(ram_fd)
            self.close()
            raise

    # -- start-up ------------------------------------------------------------------

    def _halt_firmware(self) -> str:
        """Write the firmware image: 64 KiB of HLT (0xF4), reset vector included."""
        path = os.path.join(self._tmp, "halt.bin")
        with open(path, "wb") as f:
            f.write(_HLT * _FIRMWARE_SIZE)
        return path

    def _accept(self, listener: socket.socket, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self.proc.poll() is not None:
                raise QtestError(f"QEMU exited with status {self.proc.returncode}:\n{self.log}")
            if remaining <= 0:
                raise QtestError(f"QEMU did not connect within {timeout:g} s:\n{self.log}")
            ready, _, _ = select.select([listener], [], [], min(remaining, 0.05))
            if ready:
                conn, _ = listener.accept()
                conn.setblocking(False)
                return conn

    def _gone(self, what: str) -> QtestError:
        """The error for a QEMU that went away, with its exit status and last words."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2.0)
        status = self.proc.poll()
        exited = "" if status is None else f", QEMU exited with status {status}"
        return QtestError(f"{what}{exited}:\n{self.log}")

    @property
    def log(self) -> str:
        """QEMU's own output so far (warnings, errors), at most the last 4000 chars."""
        try:
            return self._log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        """Process id of QEMU."""
        return self.proc.pid

    # -- the qtest protocol -----------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        """Receive more bytes from QEMU, waiting until ``deadline``."""
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._sock], [], [], max(0.0, remaining))
            if ready:
                try:
                    data = self._sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise self._gone(f"the qtest connection broke ({e})") from e
                if not data:
                    raise self._gone("QEMU closed the qtest connection")
                self._buf += data
                return
            if remaining <= 0:
                raise QtestError(f"QEMU did not answer within {self.timeout:g} s")

    def _next_line(self, deadline: float | None) -> str | None:
        """The next line from QEMU that is not an interrupt report (those are queued).

        With ``deadline`` None only lines already received are looked at (and None is
        returned when there is no complete one).
        """
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if deadline is None:
                    return None
                self._fill(deadline)
                continue
            line = self._buf[:nl].decode("ascii", "replace").strip()
            del self._buf[: nl + 1]
            if line.startswith("IRQ "):
                self._irq_line(line)
                continue
            return line

    def _irq_line(self, line: str) -> None:
        parts = line.split()
        if len(parts) != 3 or not parts[2].isdigit():
            return
        n = int(parts[2])
        if parts[1] == "raise":
            self.irq_levels[n] = True
            self.interrupt_counts["intx"] += 1
            self._pending.append(Interrupt("intx", line=n))
        elif parts[1] == "lower":
            self.irq_levels[n] = False

    def commands(self, lines: Sequence[str]) -> list[str]:
        """Send qtest command ``lines`` in one write; return the ``OK`` answers'
        values (the text after ``OK``) in order.

        Raises :class:`QtestError` if QEMU refused one (``FAIL``/``ERR``), died or
        did not answer in time.
        """
        if self._closed:
            raise QtestError("the qtest bus is closed")
        data = "".join(f"{line}\n" for line in lines).encode("ascii")
        try:
            self._sock.sendall(data)
        except BlockingIOError:
            self._send_slowly(data)
        except OSError as e:
            raise self._gone(f"cannot talk to QEMU ({e})") from e
        deadline = time.monotonic() + self.timeout
        out = []
        for sent in lines:
            answer = self._next_line(deadline) or ""
            if answer == "OK" or answer.startswith("OK "):
                out.append(answer[3:])
            else:
                raise QtestError(f"QEMU refused {sent!r}: {answer}")
        return out

    def _send_slowly(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.timeout
        while view:
            _, ready, _ = select.select([], [self._sock], [], self.timeout)
            if not ready or time.monotonic() > deadline:
                raise QtestError("QEMU does not accept commands")
            try:
                n = self._sock.send(view)
            except BlockingIOError:
                continue
            view = view[n:]

    def command(self, line: str) -> str:
        """Send one qtest command; return the value after ``OK`` ("" if none)."""
        return self.commands([line])[0]

    @staticmethod
    def _value(text: str) -> int:
        try:
            return int(text.split()[0], 16)
        except (IndexError, ValueError):
            raise QtestError(f"QEMU answered {text!r} where a value was expected") from None

    @staticmethod
    def _suffix(size: int) -> str:
        try:
            return _SIZES[size]
        except KeyError:
            raise ValueError(f"access size must be 1, 2, 4 or 8, not {size}") from None

    # -- Bus: PCI configuration space (configuration mechanism #1) ---------------------

    @staticmethod
    def _cf8(bdf: int, offset: int, size: int) -> int:
        if not 0 <= bdf <= 0xFFFF:
            raise ValueError(f"bad bus/device/function {bdf:#x}")
        if size not in (1, 2, 4) or not 0 <= offset <= 256 - size or offset % size:
            raise ValueError(f"bad configuration access: offset {offset:#x}, size {size}")
        return 0x80000000 | bdf << 8 | (offset & 0xFC)

    def pci_cfg_read(self, bdf: int, offset: int, size: int) -> int:
        """Read PCI configuration space through ports 0xCF8/0xCFC (all ones if absent)."""
        addr = self._cf8(bdf, offset, size)
        port = 0xCFC + (offset & 3)
        io = "l" if size == 4 else _SIZES[size]
        answers = self.commands([f"outl 0xcf8 {addr:#x}", f"in{io} {port:#x}"])
        return self._value(answers[1]) & ((1 << (8 * size)) - 1)

    def pci_cfg_write(self, bdf: int, offset: int, size: int, value: int) -> None:
        """Write PCI configuration space through ports 0xCF8/0xCFC."""
        addr = self._cf8(bdf, offset, size)
        port = 0xCFC + (offset & 3)
        io = "l" if size == 4 else _SIZES[size]
        value &= (1 << (8 * size)) - 1
        self.commands([f"outl 0xcf8 {addr:#x}", f"out{io} {port:#x} {value:#x}"])

    # -- Bus: MMIO and port I/O ----------------------------------------------------------

    def mmio_read(self, addr: int, size: int) -> int:
        """Read a little-endian register of ``size`` bytes at physical ``addr``."""
        return self._value(self.command(f"read{self._suffix(size)} {addr:#x}"))

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """Write a little-endian register."""
        value &= (1 << (8 * size)) - 1
        self.command(f"write{self._suffix(size)} {addr:#x} {value:#x}")

    def io_read(self, port: int, size: int) -> int:
        """Read an I/O port (``size`` 1, 2 or 4)."""
        if size == 8:
            raise ValueError("port I/O is at most 4 bytes wide")
        return self._value(self.command(f"in{self._suffix(size)} {port:#x}"))

    def io_write(self, port: int, size: int, value: int) -> None:
        """Write an I/O port (``size`` 1, 2 or 4)."""
        if size == 8:
            raise ValueError("port I/O is at most 4 bytes wide")
        value &= (1 << (8 * size)) - 1
        self.command(f"out{self._suffix(size)} {port:#x} {value:#x}")

    # -- Bus: interrupts -------------------------------------------------------------------

    def _collect(self) -> list[Interrupt]:
        """Interrupt reports already received plus MSI words written to the window."""
        if self._efd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
        while self._sock_readable():
            self._fill(time.monotonic())
        while self._next_line(None) is not None:
            pass  # a stray answer with no command waiting: ignore it
        if self._msi_view.tobytes() != _ZERO_WINDOW:
            words = self._msi_words
            for i in range(len(words)):
                value = words[i]
                if value:
                    words[i] = 0
                    self.interrupt_counts["msi"] += 1
                    self._pending.append(
                        Interrupt("msi", address=MSI_WINDOW_BASE + 4 * i, data=value)
                    )
        fired, self._pending = self._pending, []
        return fired

    def _sock_readable(self) -> bool:
        ready, _, _ = select.select([self._sock], [], [], 0)
        return bool(ready)

    def wait_interrupts(self, timeout: float | None) -> list[Interrupt]:
        """Interrupts raised since the last call, waiting up to ``timeout`` seconds
        (``None``: until one comes, ``0``: just look).

        INTx raises arrive on the socket; MSI messages are found by watching the MSI
        window, polled with a short, growing sleep.
        """
        if self._closed:
            raise QtestError("the qtest bus is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_MIN
        while True:
            fired = self._collect()
            if fired or timeout == 0:
                return fired
            wait = pause
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                wait = min(wait, remaining)
            if self.proc.poll() is not None:
                raise QtestError(f"QEMU exited with status {self.proc.returncode}:\n{self.log}")
            select.select([self._sock], [], [], wait)
            pause = min(pause * 2, _POLL_MAX)

    def interrupt_fds(self) -> list[int]:
        """The qtest socket (readable when an INTx report arrives) and an eventfd a
        watcher thread signals when the MSI window is written (started on the first
        call)."""
        if self._closed:
            return []
        if self._watcher is None:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._watcher = threading.Thread(
                target=self._watch, name="pyvirtio-qtest-msi", daemon=True
            )
            self._watcher.start()
        return [self._sock.fileno(), self._efd]

    def _watch(self) -> None:
        """Watcher thread: signal the eventfd while the MSI window holds a message."""
        view = self._msi_view
        while not self._watch_stop.wait(_WATCH_INTERVAL):
            if view.tobytes() != _ZERO_WINDOW:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._efd, 1)

    # -- life cycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop QEMU, unmap guest RAM, remove the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        with contextlib.suppress(AttributeError):
            self._msi_words.release()
            self._msi_view.release()
        self._finalizer()
        with contextlib.suppress(AttributeError):
            self.mem.close()

    def __enter__(self) -> QtestBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
