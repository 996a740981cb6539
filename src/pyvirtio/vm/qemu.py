"""Boot a Linux guest under QEMU (TCG) and capture its serial console.

:class:`GuestVM` builds a ``qemu-system-x86_64`` command line for a direct kernel
boot (``-kernel``/``-initrd``/``-append``) and runs it. The serial console goes to a
file (a QEMU ``file`` chardev), so a caller can poll it while the guest runs
(:meth:`RunningGuest.wait_for`) and gets all of it at the end
(:attr:`GuestResult.console`). QEMU's own messages (warnings, errors) are kept apart
in :attr:`GuestResult.qemu_log`.

The accelerator is TCG: Linux guests hang in early boot under KVM on the machines
this project runs on. With ``shared_memory=True`` guest RAM is a shared memfd
(``memory-backend-memfd,share=on`` bound to a NUMA node), which vhost-user back-ends
need to map it.

Which QEMU runs is a :class:`~pyvirtio.vm.peers.QemuPeer` (``peer=``): by default the
``qemu-system-x86_64`` on ``PATH``; :func:`~pyvirtio.vm.peers.trixie_qemu` gives QEMU
11.1 chrooted into the private trixie root (its process is still QEMU itself).

QEMU never outlives its run: :meth:`GuestVM.run` and the :class:`RunningGuest` context
manager stop it (SIGTERM, then SIGKILL) on timeout or error, and on Linux the child is
also given ``PR_SET_PDEATHSIG`` so it dies if the Python process does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pyvirtio.errors import ConfigurationError, VirtioError
from pyvirtio.vm.initramfs import DONE_MARKER, INSMOD_FAILED_MARKER, READY_MARKER
from pyvirtio.vm.peers import QemuPeer

__all__ = [
    "DEFAULT_QEMU",
    "GuestResult",
    "GuestRunError",
    "GuestVM",
    "RunningGuest",
    "marker_lines",
    "marker_values",
]

DEFAULT_QEMU = "qemu-system-x86_64"
"""The QEMU binary looked up on ``PATH``."""

_BASE_APPEND = ("console=ttyS0", "panic=-1")
_POLL_INTERVAL = 0.05
_TERM_GRACE = 5.0
_PR_SET_PDEATHSIG = 1


class GuestRunError(VirtioError):
    """A guest run did not reach its done marker (timeout, QEMU error, failed check)."""


def _clean_lines(text: str) -> list[str]:
    return [line.rstrip("\r") for line in text.split("\n")]


def marker_lines(text: str, prefix: str) -> list[str]:
    """Console lines that start with ``prefix`` (``\\r`` of the serial line removed).

    A marker may be preceded on its line by kernel output that was not yet
    terminated; lines that merely contain ``prefix`` are returned from the prefix on.
    """
    found = []
    for line in _clean_lines(text):
        pos = line.find(prefix)
        if pos >= 0:
            found.append(line[pos:])
    return found


def marker_values(text: str, prefix: str) -> list[str]:
    """What follows ``prefix`` (and one separating space) on each marker line."""
    values = []
    for line in marker_lines(text, prefix):
        rest = line[len(prefix) :]
        values.append(rest[1:] if rest.startswith((" ", "=", ":")) else rest)
    return values


@dataclass
class GuestResult:
    """The outcome of one guest run."""

    console: str
    """Everything the guest wrote to its serial console."""
    returncode: int | None
    """QEMU's exit status (``None`` if it had to be killed and never reported one)."""
    timed_out: bool
    """True when the run hit its timeout and QEMU was stopped."""
    elapsed: float
    """Seconds from QEMU's start to its exit."""
    qemu_log: str
    """QEMU's own stdout/stderr (warnings, errors)."""
    command: list[str] = field(default_factory=list)
    """The command line that ran."""

    def lines(self) -> list[str]:
        """The console as lines, without ``\\r``."""
        return _clean_lines(self.console)

    def marker_lines(self, prefix: str) -> list[str]:
        """Console lines carrying ``prefix`` (see :func:`marker_lines`)."""
        return marker_lines(self.console, prefix)

    def marker_values(self, prefix: str) -> list[str]:
        """Values after ``prefix`` on the marker lines (see :func:`marker_values`)."""
        return marker_values(self.console, prefix)

    def marker_value(self, prefix: str) -> str:
        """The value of the first ``prefix`` marker; :class:`GuestRunError` if none."""
        values = self.marker_values(prefix)
        if not values:
            raise GuestRunError(f"no {prefix!r} line in the guest console\n{self.describe()}")
        return values[0]

    @property
    def ready(self) -> bool:
        """The guest's ``/init`` loaded its modules and started the snippet."""
        return bool(self.marker_lines(READY_MARKER))

    @property
    def guest_rc(self) -> int | None:
        """The snippet's exit status from the done marker, ``None`` if it never ended."""
        for value in self.marker_values(DONE_MARKER):
            m = re.match(r"rc=(\d+)", value)
            if m:
                return int(m.group(1))
        return None

    @property
    def failed_modules(self) -> list[str]:
        """Modules the guest could not ``insmod``."""
        return self.marker_values(INSMOD_FAILED_MARKER)

    def describe(self, tail: int = 60) -> str:
        """A short diagnostic: status, QEMU log and the last ``tail`` console lines."""
        lines = self.lines()
        return "\n".join(
            [
                f"qemu rc={self.returncode} timed_out={self.timed_out} "
                f"elapsed={self.elapsed:.1f}s guest_rc={self.guest_rc}",
                f"command: {shlex.join(self.command)}",
                f"qemu log: {self.qemu_log.strip() or '(empty)'}",
                f"--- last {tail} console lines ---",
                *lines[-tail:],
            ]
        )

    def check(self) -> GuestResult:
        """Raise :class:`GuestRunError` unless every module loaded and the snippet
        exited 0; return ``self`` for chaining."""
        if self.timed_out:
            raise GuestRunError(f"guest timed out\n{self.describe()}")
        if self.failed_modules:
            raise GuestRunError(f"insmod failed for {self.failed_modules}\n{self.describe()}")
        rc = self.guest_rc
        if rc is None:
            raise GuestRunError(f"guest never reached {DONE_MARKER}\n{self.describe()}")
        if rc != 0:
            raise GuestRunError(f"guest check script exited {rc}\n{self.describe()}")
        return self


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that sets ``PR_SET_PDEATHSIG(SIGKILL)``, or None off Linux."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


def _chardev_path(path: Path) -> str:
    # QEMU option values double a comma to escape it.
    return str(path).replace(",", ",,")


@dataclass
class GuestVM:
    """A QEMU guest booted straight into a kernel and initramfs (see module docs).

    Extra devices are plain QEMU arguments, added with :meth:`add_args` or the
    :meth:`device`/:meth:`chardev`/:meth:`netdev`/:meth:`drive`/:meth:`object`
    helpers, e.g. ``vm.chardev("socket,id=c0,path=/tmp/blk.sock")
    .device("vhost-user-blk-pci,chardev=c0")``.
    """

    kernel: Path
    """The guest kernel image (``vmlinuz``)."""
    initramfs: Path
    """The initramfs (see :func:`pyvirtio.vm.initramfs.build_initramfs`)."""
    memory_mib: int = 256
    """Guest RAM in MiB."""
    shared_memory: bool = False
    """Back guest RAM with a shared memfd (needed by vhost-user back-ends)."""
    smp: int = 1
    """Number of vCPUs."""
    machine: str = "pc"
    """QEMU machine type."""
    append: Sequence[str] = ()
    """Kernel arguments after ``console=ttyS0 panic=-1``."""
    extra_args: list[str] = field(default_factory=list)
    """Further QEMU arguments (devices, chardevs, netdevs, ...)."""
    qemu: str = DEFAULT_QEMU
    """The QEMU binary (name on ``PATH`` or a path); ignored when ``peer`` is set."""
    peer: QemuPeer | None = None
    """Which QEMU generation runs the guest (:mod:`pyvirtio.vm.peers`), e.g.
    :func:`~pyvirtio.vm.peers.trixie_qemu`; ``None``: the ``qemu`` binary above. A
    chrooted peer sees the host's ``/tmp`` and ``/dev``; the kernel's, initramfs' and
    console's directories are shared with it automatically, any other path in the
    arguments (images, sockets) must be under ``/tmp``."""
    die_with_parent: bool = True
    """Give QEMU ``PR_SET_PDEATHSIG``: it is killed when the thread that started it
    exits. Turn off to start a guest from a short-lived thread."""

    def add_args(self, *args: str) -> GuestVM:
        """Append raw QEMU arguments; returns ``self``."""
        self.extra_args.extend(args)
        return self

    def device(self, spec: str) -> GuestVM:
        """Add ``-device spec``."""
        return self.add_args("-device", spec)

    def chardev(self, spec: str) -> GuestVM:
        """Add ``-chardev spec``."""
        return self.add_args("-chardev", spec)

    def netdev(self, spec: str) -> GuestVM:
        """Add ``-netdev spec``."""
        return self.add_args("-netdev", spec)

    def drive(self, spec: str) -> GuestVM:
        """Add ``-drive spec``."""
        return self.add_args("-drive", spec)

    def object(self, spec: str) -> GuestVM:
        """Add ``-object spec``."""
        return self.add_args("-object", spec)

    def kernel_cmdline(self) -> str:
        """The ``-append`` string."""
        return " ".join([*_BASE_APPEND, *self.append])

    def command(self, console_path: str | os.PathLike[str]) -> list[str]:
        """The full QEMU command line, serial console written to ``console_path``."""
        if self.memory_mib <= 0 or self.smp <= 0:
            raise ConfigurationError("memory_mib and smp must be positive")
        chroot = self.peer is not None and self.peer.root is not None

        def host_path(p: str | os.PathLike[str]) -> str:
            # A chrooted QEMU resolves relative paths against its own cwd (/): give it
            # absolute ones, which QemuPeer.command makes visible in the root.
            return str(Path(p).resolve()) if chroot else str(p)

        cmd = [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-machine", self.machine,
            "-accel", "tcg",
            "-smp", str(self.smp),
            "-m", f"{self.memory_mib}M",
        ]  # fmt: skip
        if self.shared_memory:
            cmd += [
                "-object", f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on",
                "-numa", "node,memdev=mem",
            ]  # fmt: skip
        console = Path(host_path(console_path))
        cmd += [
            "-kernel", host_path(self.kernel),
            "-initrd", host_path(self.initramfs),
            "-append", self.kernel_cmdline(),
            "-chardev", f"file,id=pyvirtio-console,path={_chardev_path(console)}",
            "-serial", "chardev:pyvirtio-console",
        ]  # fmt: skip
        cmd += self.extra_args
        if self.peer is not None:
            return self.peer.command(cmd, share=[self.kernel, self.initramfs, console.parent])
        qemu = shutil.which(self.qemu)
        if qemu is None:
            raise ConfigurationError(
                f"{self.qemu} not found; install qemu-system-x86 (scripts/install-deps.sh)"
            )
        return [qemu, *cmd]

    def start(self, console_path: str | os.PathLike[str] | None = None) -> RunningGuest:
        """Start QEMU; returns a :class:`RunningGuest` (use it as a context manager).

        The console goes to ``console_path`` if given (kept), else to a temporary
        file removed when the guest is closed.
        """
        workdir = None
        if console_path is None:
            workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-vm-"))
            console = workdir / "console.log"
        else:
            console = Path(console_path)
        console.write_bytes(b"")
        log_path = console.with_name(console.name + ".qemu.log")
        cmd = self.command(console)
        log = open(log_path, "wb")  # noqa: SIM115 - handed to RunningGuest, closed there
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent() if self.die_with_parent else None,
            )
        except BaseException:
            log.close()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return RunningGuest(proc, cmd, console, log, log_path, workdir)

    def run(
        self, timeout: float = 120.0, console_path: str | os.PathLike[str] | None = None
    ) -> GuestResult:
        """Boot the guest, wait for QEMU to exit (at most ``timeout`` s), return the
        result. On timeout QEMU is stopped and ``timed_out`` is set."""
        with self.start(console_path) as guest:
            return guest.wait(timeout)


class RunningGuest:
    """A QEMU process started by :meth:`GuestVM.start`.

    Use as a context manager: leaving it stops QEMU if it still runs and removes the
    temporary console file.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        command: list[str],
        console_path: Path,
        log_file: object,
        log_path: Path,
        workdir: Path | None,
    ) -> None:
        self.process = process
        self.command = command
        self.console_path = console_path
        self._log_file = log_file
        self._log_path = log_path
        self._workdir = workdir
        self._started = time.monotonic()
        self._ended: float | None = None
        self._timed_out = False
        self._result: GuestResult | None = None

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.process.pid

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.process.poll() is None

    def console(self) -> str:
        """The console output so far."""
        try:
            return self.console_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def qemu_log(self) -> str:
        """QEMU's own output so far (its warnings and errors: an option it refuses,
        a back-end it cannot reach)."""
        try:
            return self._log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""

    def diagnostics(self, tail: int = 60) -> str:
        """For a failed check: QEMU's state and output, and the last console lines (a
        guest that never booted has an empty console; QEMU's output says why)."""
        lines = self.console().splitlines()
        return "\n".join(
            [
                f"qemu alive={self.alive()} rc={self.process.poll()}",
                f"command: {shlex.join(self.command)}",
                f"qemu log: {self.qemu_log().strip() or '(empty)'}",
                f"--- last {tail} console lines ---",
                *lines[-tail:],
            ]
        )

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """Wait until ``pattern`` (a regex) matches the console; ``None`` if QEMU exits
        or ``timeout`` s pass first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.console())
            if m is not None:
                return m
            if not self.alive() or time.monotonic() >= deadline:
                # One last look: the guest may have written it just before exiting.
                return regex.search(self.console())
            time.sleep(_POLL_INTERVAL)

    def kill(self) -> None:
        """Stop QEMU: SIGTERM, then SIGKILL after a grace period. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_TERM_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._ended is None:
            self._ended = time.monotonic()

    def wait(self, timeout: float) -> GuestResult:
        """Wait up to ``timeout`` s for QEMU to exit (stopping it after that) and
        return the :class:`GuestResult`."""
        if self._result is not None:
            return self._result
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self.kill()
        if self._ended is None:
            self._ended = time.monotonic()
        self._result = self._collect()
        return self._result

    def _collect(self) -> GuestResult:
        close = getattr(self._log_file, "close", None)
        if close is not None:
            close()
        try:
            qemu_log = self._log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            qemu_log = ""
        end = self._ended if self._ended is not None else time.monotonic()
        return GuestResult(
            console=self.console(),
            returncode=self.process.returncode,
            timed_out=self._timed_out,
            elapsed=end - self._started,
            qemu_log=qemu_log,
            command=list(self.command),
        )

    def close(self) -> GuestResult:
        """Stop QEMU if needed, gather the result, remove temporary files."""
        if self._result is None:
            self.kill()
            self._result = self._collect()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return self._result

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
