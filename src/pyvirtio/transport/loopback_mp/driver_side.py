"""Driver side of the two-process loopback: a ``DriverTransport`` to a device process.

:class:`MultiprocessLoopbackTransport` owns guest RAM (memfd), one kick and one call
eventfd per queue and a configuration eventfd, and passes them to the device process
over the control socket (``SCM_RIGHTS``). Register operations are request/response
control messages (:mod:`.protocol`); notifications are eventfd writes:
:meth:`~MultiprocessLoopbackTransport.notify` writes the queue's kick eventfd and
:meth:`~MultiprocessLoopbackTransport.poll_interrupts` polls the call and
configuration eventfds (which :meth:`~MultiprocessLoopbackTransport.interrupt_fds`
returns for event loops).

The device process is spawned by :class:`DeviceProcess` with :mod:`subprocess` (not
:mod:`multiprocessing`, whose spawn context starts a resource tracker process and
keeps an fd to it): it runs ``python -m pyvirtio.transport.loopback_mp.device_side``
with the child's end of the socket pair, a ``module:callable`` device factory and
JSON keyword arguments; the child's ``PYTHONPATH`` is this process's ``sys.path`` so
it imports the same modules. Closing asks the device to shut down, closes the
socket, and reaps the child (killing it if it does not exit in time): no zombie,
no leaked fd.

::

    drv = connect(RngDriver, "pyvirtio.devices.rng.device:RngDevice")
    ...
    drv.close()
    drv.transport.close()
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyvirtio.core.device_state import MAX_CONFIG_ACCESS
from pyvirtio.core.driver import CONFIG_CHANGE, VirtioDriver
from pyvirtio.errors import ConfigurationError, DeviceError, DriverError, ProtocolError
from pyvirtio.memory.allocator import GuestAllocator
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.transport.loopback_mp import protocol as P
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = ["DEFAULT_MEM_SIZE", "DeviceProcess", "MultiprocessLoopbackTransport", "connect"]

#: Guest RAM of a transport unless told otherwise (16 MiB).
DEFAULT_MEM_SIZE = 16 << 20

D = TypeVar("D", bound=VirtioDriver)

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


def _factory_spec(factory: str | Callable[..., Any]) -> str:
    if isinstance(factory, str):
        return factory
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise ConfigurationError(
            f"device factory {factory!r} must be importable by name (a module-level "
            "class or function), or given as 'module:name'"
        )
    return f"{module}:{qualname}"


class DeviceProcess:
    """A device served in a child process, connected by a socket pair.

    ``factory`` is a ``"module:name"`` string or a module-level callable (class or
    function) returning a :class:`~pyvirtio.core.device.VirtioDevice`; ``kwargs``
    (JSON-serializable) are passed to it in the child. :attr:`sock` is this side of
    the control socket.
    """

    def __init__(
        self, factory: str | Callable[..., Any], kwargs: dict[str, Any] | None = None
    ) -> None:
        spec = _factory_spec(factory)
        args_json = json.dumps(kwargs or {})
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pyvirtio.transport.loopback_mp.device_side",
                    "--fd",
                    str(child.fileno()),
                    "--factory",
                    spec,
                    "--kwargs",
                    args_json,
                ],
                pass_fds=[child.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                # a terminal's Ctrl-C goes to the driver, which shuts the device down
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        #: this side of the control socket
        self.sock = parent

    @property
    def pid(self) -> int:
        """Process id of the device process."""
        return self.popen.pid

    def close(self, timeout: float = 10.0) -> int:
        """Close the socket (the device sees EOF and exits) and reap the process,
        killing it after ``timeout`` seconds. Returns its exit status."""
        self.sock.close()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


class MultiprocessLoopbackTransport:
    """A :class:`~pyvirtio.core.driver.DriverTransport` to a device in another process.

    ``sock`` is a connected ``SOCK_SEQPACKET`` socket whose peer serves a device
    (:func:`~pyvirtio.transport.loopback_mp.device_side.serve`); the transport takes
    it over. ``process``, if given, is closed (and reaped) with the transport. Use
    :meth:`spawn` to start a device process and connect in one step.

    A request the device refuses raises :class:`~pyvirtio.errors.DriverError` (it
    said we broke a rule) or :class:`~pyvirtio.errors.ProtocolError`; a device that
    answers nonsense, closes the socket or does not answer within ``reply_timeout``
    seconds raises :class:`~pyvirtio.errors.DeviceError` and the transport is dead.
    """

    def __init__(
        self,
        sock: socket.socket,
        mem_size: int = DEFAULT_MEM_SIZE,
        *,
        legacy: bool = False,
        process: DeviceProcess | None = None,
        reply_timeout: float = 30.0,
    ) -> None:
        page = mmap.PAGESIZE
        if mem_size < 2 * page or mem_size % page:
            raise ConfigurationError(
                f"loopback guest RAM must be a multiple of {page} bytes, at least {2 * page}"
            )
        self.legacy = legacy
        self._sock = sock
        self._process = process
        self._reply_timeout = reply_timeout
        self._dead: DeviceError | None = None
        self._closed = False
        self._kick: dict[int, int] = {}
        self._ready: set[int] = set()
        self._call: dict[int, int] = {}
        self._fd_queue: dict[int, int] = {}
        self._poller = select.poll()
        self._config_fd = -1
        try:
            self.mem = GuestMemory.create(mem_size, name="pyvirtio-loopback-mp")
        except BaseException:
            if process is not None:
                process.close()
            else:
                sock.close()
            raise
        self.allocator = GuestAllocator(page, mem_size - page)
        self._reply_poll = select.poll()
        self._reply_poll.register(sock.fileno(), select.POLLIN)
        try:
            self._config_fd = os.eventfd(0, _EFD_FLAGS)
            self._fd_queue[self._config_fd] = CONFIG_CHANGE
            self._poller.register(self._config_fd, select.POLLIN)
            self._poller.register(self._sock.fileno(), select.POLLIN)
            regions = [P.Region(r.guest_phys_addr, r.size, r.mmap_offset) for r in self.mem.regions]
            flags = P.HelloFlags.LEGACY if legacy else P.HelloFlags.NONE
            reply = self._request(
                P.Op.HELLO,
                P.Hello(P.PROTOCOL_VERSION, flags, len(regions)),
                P.encode_regions(regions),
                [r.fd for r in self.mem.regions] + [self._config_fd],
            )
            self._device_id = int(reply.body.device_id)
            self._num_queues = int(reply.body.num_queues)
        except BaseException:
            self.close()
            raise

    @classmethod
    def spawn(
        cls,
        factory: str | Callable[..., Any],
        mem_size: int = DEFAULT_MEM_SIZE,
        *,
        legacy: bool = False,
        factory_kwargs: dict[str, Any] | None = None,
        reply_timeout: float = 30.0,
    ) -> MultiprocessLoopbackTransport:
        """Start a device process (see :class:`DeviceProcess`) and connect to it."""
        proc = DeviceProcess(factory, factory_kwargs)
        return cls(proc.sock, mem_size, legacy=legacy, process=proc, reply_timeout=reply_timeout)

    @property
    def process(self) -> DeviceProcess | None:
        """The device process this transport spawned (None if given a socket)."""
        return self._process

    # -- control messages -------------------------------------------------------------

    def _fail(self, message: str) -> DeviceError:
        self._dead = DeviceError(message)
        return self._dead

    def _request(
        self, op: P.Op, body: Any = None, tail: bytes = b"", fds: Sequence[int] = ()
    ) -> P.Message:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise ConfigurationError("the transport is closed")
        data = P.encode(op, body, tail)
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                self._sock.sendmsg([data], anc)
            else:
                self._sock.send(data)
            if not self._reply_poll.poll(int(self._reply_timeout * 1000)):
                raise self._fail(f"the device did not answer {op.name} in time")
            raw = self._sock.recv(P.MAX_MESSAGE + 1)
        except OSError as e:
            raise self._fail(f"control connection lost during {op.name}: {e}") from None
        if not raw:
            raise self._fail(f"the device process closed the connection during {op.name}")
        try:
            msg = P.decode(raw, reply=True)
        except ProtocolError as e:
            raise self._fail(f"malformed reply to {op.name}: {e}") from None
        if msg.op != op:
            raise self._fail(f"reply to {op.name} names {msg.op.name}")
        if msg.is_error:
            code, text = msg.error()
            if code == P.ErrorCode.DRIVER:
                raise DriverError(text)
            if code == P.ErrorCode.PROTOCOL:
                raise ProtocolError(f"the device refused {op.name}: {text}")
            raise DeviceError(f"the device failed {op.name}: {text}")
        return msg

    # -- DriverTransport ----------------------------------------------------------------

    def device_id(self) -> int:
        """The device type the device process reported."""
        return self._device_id

    def reset(self) -> None:
        """Reset the device (done when this returns); drop stale notifications."""
        self._request(P.Op.RESET)
        self._ready.clear()
        self._drain()

    def get_status(self) -> int:
        """Read the device status field."""
        return int(self._request(P.Op.GET_STATUS).body.value)

    def set_status(self, status: int) -> None:
        """Write the device status field."""
        self._request(P.Op.SET_STATUS, P.Value32(status & 0xFF))

    def get_device_features(self) -> int:
        """Every feature bit the device offers."""
        body = self._request(P.Op.GET_FEATURES).body
        return int(body.lo) | int(body.hi) << 64

    def set_driver_features(self, features: int) -> None:
        """Write the feature bits the driver accepts (up to 128 bits)."""
        mask = (1 << 64) - 1
        self._request(P.Op.SET_FEATURES, P.Features(features & mask, features >> 64 & mask))

    def config_generation(self) -> int:
        """The configuration generation counter (32 bits)."""
        return int(self._request(P.Op.GET_CONFIG_GENERATION).body.value)

    def read_config(self, offset: int, size: int) -> bytes:
        """Read device configuration space (past the end reads as zeros; at most
        :data:`~pyvirtio.core.device_state.MAX_CONFIG_ACCESS` bytes at once)."""
        if not 0 <= offset <= 0xFFFFFFFF or not 0 <= size <= MAX_CONFIG_ACCESS:
            raise ConfigurationError(f"configuration read {offset}+{size} out of range")
        tail = self._request(P.Op.READ_CONFIG, P.ConfigAccess(offset, size)).tail
        if len(tail) != size:
            raise self._fail(f"configuration read of {size} bytes returned {len(tail)}")
        return tail

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device configuration space."""
        if not 0 <= offset <= 0xFFFFFFFF or len(data) > MAX_CONFIG_ACCESS:
            raise ConfigurationError(f"configuration write {offset}+{len(data)} out of range")
        self._request(P.Op.WRITE_CONFIG, P.ConfigAccess(offset, len(data)), bytes(data))

    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        return self._num_queues

    def queue_max_size(self, index: int) -> int:
        """The largest size queue ``index`` accepts (0: no such queue)."""
        if not 0 <= index < self._num_queues:
            return 0
        return int(self._request(P.Op.GET_QUEUE_MAX, P.QueueIndex(index)).body.value)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Send size and addresses of queue ``index`` with its kick and call eventfds;
        the device enables it. Raises :class:`~pyvirtio.errors.DriverError` if the
        device refused the queue."""
        if not 0 <= index < self._num_queues:
            raise DriverError(f"queue {index} does not exist")
        if index not in self._kick:
            kick = os.eventfd(0, _EFD_FLAGS)
            try:
                call = os.eventfd(0, _EFD_FLAGS)
            except BaseException:
                os.close(kick)
                raise
            self._kick[index] = kick
            self._call[index] = call
            self._fd_queue[call] = index
            self._poller.register(call, select.POLLIN)
        body = P.QueueSetup(index, size, addrs.desc, addrs.driver, addrs.device)
        self._ready.discard(index)
        self._request(P.Op.SETUP_QUEUE, body, fds=[self._kick[index], self._call[index]])
        self._ready.add(index)

    def reset_queue(self, index: int) -> None:
        """Reset queue ``index`` alone (VIRTIO_F_RING_RESET, virtio-v1.2 §2.6.1); raises
        :class:`~pyvirtio.errors.DriverError` if the device refused. Not part of
        ``DriverTransport``."""
        self._request(P.Op.RESET_QUEUE, P.QueueIndex(index))
        self._ready.discard(index)

    def notify(self, index: int) -> None:
        """Available buffer notification: write the queue's kick eventfd."""
        if index not in self._ready:
            raise DriverError(f"notification for queue {index}, which is not set up")
        os.eventfd_write(self._kick[index], 1)

    def poll_interrupts(self, timeout: float | None) -> set[int]:
        """Wait up to ``timeout`` seconds (None: forever) for a call or configuration
        eventfd; return the queue indexes signalled plus
        :data:`~pyvirtio.core.driver.CONFIG_CHANGE`.

        Raises :class:`~pyvirtio.errors.DeviceError` if the device process went away
        (the control socket became readable: no message is ever unsolicited).
        """
        if self._dead is not None:
            raise self._dead
        ms = None if timeout is None else max(0, int(timeout * 1000))
        fired: set[int] = set()
        for fd, _ in self._poller.poll(ms):
            if fd == self._sock.fileno():
                raise self._fail("the device process closed the connection")
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            fired.add(self._fd_queue[fd])
        return fired

    def _drain(self) -> None:
        for fd in [self._config_fd, *self._call.values()]:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def interrupt_fds(self) -> list[int]:
        """The configuration eventfd, then each set-up queue's call eventfd."""
        return [self._config_fd] + [self._call[i] for i in sorted(self._call)]

    def close(self) -> None:
        """Shut the device down, reap its process, release fds and guest RAM
        (idempotent)."""
        if self._closed:
            return
        if self._dead is None and self._process is not None and self._config_fd >= 0:
            with contextlib.suppress(DeviceError, ProtocolError, DriverError):
                self._request(P.Op.SHUTDOWN)
        self._closed = True
        if self._process is not None:
            self._process.close()
        else:
            self._sock.close()
        for fd in [self._config_fd, *self._kick.values(), *self._call.values()]:
            if fd >= 0:
                os.close(fd)
        self._config_fd = -1
        self._kick.clear()
        self._call.clear()
        self._fd_queue.clear()
        self.mem.close()


def connect(
    driver_cls: type[D],
    factory: str | Callable[..., Any],
    *,
    mem_size: int = DEFAULT_MEM_SIZE,
    legacy: bool = False,
    factory_kwargs: dict[str, Any] | None = None,
    **driver_kw: Any,
) -> D:
    """Spawn a device process from ``factory``, build ``driver_cls(transport,
    **driver_kw)`` over a :class:`MultiprocessLoopbackTransport` and initialize it.

    The caller closes both: ``drv.close(); drv.transport.close()``.
    """
    transport = MultiprocessLoopbackTransport.spawn(
        factory, mem_size, legacy=legacy, factory_kwargs=factory_kwargs
    )
    try:
        driver = driver_cls(transport, **driver_kw)
        driver.initialize()
    except BaseException:
        transport.close()
        raise
    return driver
