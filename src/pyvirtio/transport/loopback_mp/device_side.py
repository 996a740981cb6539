"""Device side of the two-process loopback: serve a ``VirtioDevice`` on a socket.

:class:`DeviceServer` is the request handler (no socket I/O): control messages in,
replies out, around a :class:`~pyvirtio.core.device_state.DeviceState`. It owns the
file descriptors the driver sent (guest RAM memfds, eventfds) and validates them
before use. :func:`serve` is the thin I/O adapter: a ``selectors`` loop over the
control socket, the queues' kick eventfds and the device's host event sources
(descriptors and timers it declares, :class:`~pyvirtio.core.events.HostEvents`); used
buffer and configuration change notifications are eventfd writes.

Run as a program, this module is the device process the driver side spawns::

    python -m pyvirtio.transport.loopback_mp.device_side --fd N \\
        --factory package.module:DeviceClass [--kwargs '{"num_queues": 2}']

The process serves until the driver sends SHUTDOWN or closes its end of the socket
(which also happens when the driver process dies), then exits 0. A malformed
request gets an error reply; the connection stays usable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import selectors
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.core.device_state import DeviceState
from pyvirtio.errors import DriverError, ProtocolError, VirtioError
from pyvirtio.memory.guest_memory import GuestMemory, MemoryRegion, seal_against_shrinking
from pyvirtio.transport._events import HostEventWatch, HostFd
from pyvirtio.transport._unix import close_fds
from pyvirtio.transport.loopback_mp import protocol as P
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = ["DeviceServer", "load_factory", "main", "serve"]

_log = logging.getLogger(__name__)

#: Most file descriptors accepted with one message (HELLO: regions + config eventfd).
MAX_FDS = P.MAX_REGIONS + 1


def _is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class DeviceServer:
    """Answers the driver's control requests for one device (sans socket I/O).

    :meth:`handle` takes one received message and the file descriptors that came
    with it (it owns them from then on: they are kept or closed) and returns the
    reply to send. :attr:`kick_fds` tells the I/O loop which eventfd to watch for
    each queue; :meth:`kick` runs the device for a queue.
    """

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.state: DeviceState | None = None
        self.mem: GuestMemory | None = None
        #: queue index -> kick eventfd to watch
        self.kick_fds: dict[int, int] = {}
        self._call_fds: dict[int, int] = {}
        self._config_fd = -1
        #: True once SHUTDOWN was received (the loop exits after replying)
        self.finished = False

    # -- notifications to the driver -----------------------------------------------

    @staticmethod
    def _signal(fd: int) -> None:
        if fd < 0:
            return
        # a counter the driver saturated (the fd is non-blocking): drop the signal
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)

    def _on_used(self, index: int) -> None:
        self._signal(self._call_fds.get(index, -1))

    def _on_config(self) -> None:
        self._signal(self._config_fd)

    # -- requests ---------------------------------------------------------------------

    def handle(self, data: bytes, fds: Sequence[int]) -> bytes:
        """Serve one request; returns the reply (an error reply if it was refused)."""
        op = P.HEADER.unpack_from(data).op if len(data) >= P.HEADER.size else 0
        fds = list(fds)
        try:
            msg = P.decode(data)
            want = P.expected_fds(msg.op, msg.body)
            if len(fds) != want:
                raise ProtocolError(f"{msg.op.name} carries {len(fds)} fds, expected {want}")
            if msg.op != P.Op.HELLO and self.state is None:
                raise ProtocolError(f"{msg.op.name} before HELLO")
            reply = self._dispatch(msg, fds)
            fds = []  # ownership passed on
            return reply
        except ProtocolError as e:
            _log.warning("malformed request: %s", e)
            return P.encode_error(op, P.ErrorCode.PROTOCOL, str(e))
        except DriverError as e:
            return P.encode_error(op, P.ErrorCode.DRIVER, str(e))
        except VirtioError as e:
            return P.encode_error(op, P.ErrorCode.DEVICE, str(e))
        except Exception as e:  # a device model bug or an unusable fd: keep serving
            _log.exception("request %d failed", op)
            return P.encode_error(op, P.ErrorCode.DEVICE, f"device failure: {e!r}")
        finally:
            close_fds(fds)

    def _dispatch(self, msg: P.Message, fds: list[int]) -> bytes:
        op = msg.op
        if op == P.Op.HELLO:
            return self._hello(msg, fds)
        st = self.state
        assert st is not None  # checked by handle()
        body = msg.body
        if op == P.Op.RESET:
            st.write_status(0)
            return P.encode(op, reply=True)
        if op == P.Op.GET_STATUS:
            return P.encode(op, P.Value32(st.read_status()), reply=True)
        if op == P.Op.SET_STATUS:
            st.write_status(body.value)
            return P.encode(op, reply=True)
        if op == P.Op.GET_FEATURES:
            f = st.device_features
            return P.encode(op, P.Features(f & (1 << 64) - 1, f >> 64), reply=True)
        if op == P.Op.SET_FEATURES:
            st.write_driver_features(body.lo | body.hi << 64)
            return P.encode(op, reply=True)
        if op == P.Op.GET_CONFIG_GENERATION:
            return P.encode(op, P.Value32(st.config_generation & 0xFFFFFFFF), reply=True)
        if op == P.Op.READ_CONFIG:
            size = min(body.size, P.MAX_MESSAGE - P.HEADER.size)
            return P.encode(op, tail=st.read_config(body.offset, size), reply=True)
        if op == P.Op.WRITE_CONFIG:
            st.write_config(body.offset, msg.tail)
            return P.encode(op, reply=True)
        if op == P.Op.GET_QUEUE_MAX:
            return P.encode(op, P.Value32(st.queue_max_size(body.queue_index)), reply=True)
        if op == P.Op.SETUP_QUEUE:
            return self._setup_queue(msg, fds)
        if op == P.Op.RESET_QUEUE:
            before = st.violation_count
            st.reset_queue(body.queue_index)
            if st.violation_count > before:
                raise st.violations[-1]
            self._drop_queue_fds(body.queue_index)
            return P.encode(op, reply=True)
        if op == P.Op.SHUTDOWN:
            self.finished = True
            return P.encode(op, reply=True)
        raise ProtocolError(f"unhandled op {op.name}")  # pragma: no cover - table is complete

    def _hello(self, msg: P.Message, fds: list[int]) -> bytes:
        if self.state is not None:
            raise ProtocolError("second HELLO")
        body = msg.body
        if body.version != P.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {body.version}, this device speaks 1")
        if body.flags & ~int(P.HelloFlags.LEGACY):
            raise ProtocolError(f"undefined HELLO flags {body.flags:#x}")
        regions = P.decode_regions(msg.tail)
        config_fd = fds[-1]
        if not _is_eventfd(config_fd):
            raise ProtocolError("HELLO: the configuration fd is not an eventfd")
        mem = GuestMemory()
        taken: list[int] = []
        try:
            for r, fd in zip(regions, fds[:-1], strict=True):
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ProtocolError("HELLO: a memory fd is not a memfd or file")
                why = seal_against_shrinking(fd)
                if why is not None:
                    # the driver could truncate it under our mapping (SIGBUS)
                    raise ProtocolError(f"HELLO: a memory fd cannot be sealed: {why}")
                if r.size == 0 or r.mmap_offset + r.size > st.st_size:
                    raise ProtocolError(
                        f"HELLO: region {r.guest_phys_addr:#x}+{r.size:#x} at offset "
                        f"{r.mmap_offset:#x} exceeds its file of {st.st_size:#x} bytes"
                    )
                region = MemoryRegion(
                    guest_phys_addr=r.guest_phys_addr,
                    size=r.size,
                    fd=fd,
                    mmap_offset=r.mmap_offset,
                )
                taken.append(fd)
                try:
                    mem.add_region(region)
                except (VirtioError, OSError, ValueError, OverflowError) as e:
                    region.close()
                    raise ProtocolError(f"HELLO: cannot map region: {e}") from None
        except BaseException:
            mem.close()
            close_fds([fd for fd in fds if fd not in taken])
            fds.clear()
            raise
        os.set_blocking(config_fd, False)
        self.mem = mem
        self._config_fd = config_fd
        self.state = DeviceState(
            self.device,
            mem,
            legacy=bool(body.flags & P.HelloFlags.LEGACY),
            on_used=self._on_used,
            on_config=self._on_config,
        )
        reply = P.HelloReply(P.PROTOCOL_VERSION, int(self.device.device_id), self.state.num_queues)
        return P.encode(P.Op.HELLO, reply, reply=True)

    def _setup_queue(self, msg: P.Message, fds: list[int]) -> bytes:
        st = self.state
        assert st is not None
        body = msg.body
        kick, call = fds
        if not (_is_eventfd(kick) and _is_eventfd(call)):
            raise ProtocolError("SETUP_QUEUE: kick and call must be eventfds")
        if not 0 <= body.queue_index < st.num_queues:
            raise DriverError(
                f"queue {body.queue_index} does not exist", 'virtio-v1.2 §2.6 "Virtqueues"'
            )
        before = st.violation_count
        st.setup_queue(
            body.queue_index, body.size, QueueAddresses(body.desc, body.driver, body.device)
        )
        if not st.queue_enabled(body.queue_index):
            if st.violation_count > before:
                raise st.violations[-1]
            raise DriverError(f"queue {body.queue_index} was not enabled")
        self._drop_queue_fds(body.queue_index)
        os.set_blocking(kick, False)
        os.set_blocking(call, False)
        self.kick_fds[body.queue_index] = kick
        self._call_fds[body.queue_index] = call
        return P.encode(P.Op.SETUP_QUEUE, reply=True)

    def _drop_queue_fds(self, index: int) -> None:
        close_fds(
            [fd for fd in (self.kick_fds.pop(index, -1), self._call_fds.pop(index, -1)) if fd >= 0]
        )

    # -- kicks --------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        """An available buffer notification arrived for queue ``index``.

        A bug of the device model (any exception) is logged and turned into
        DEVICE_NEEDS_RESET by the device's failure path, so the process keeps serving.
        """
        st = self.state
        if st is None:
            return
        st.notify(index)

    def close(self) -> None:
        """Reset the device and release every fd and mapping."""
        if self.state is not None:
            self.state.close()
            self.state = None
        close_fds(list(self.kick_fds.values()) + list(self._call_fds.values()))
        self.kick_fds.clear()
        self._call_fds.clear()
        if self._config_fd >= 0:
            close_fds([self._config_fd])
            self._config_fd = -1
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def serve(sock: socket.socket, device: VirtioDevice) -> None:
    """Serve ``device`` on the connected ``SOCK_SEQPACKET`` socket until SHUTDOWN or
    until the driver closes the connection (or dies); then release everything.

    Never raises for anything the driver sends; returns when the peer is gone.
    """
    server = DeviceServer(device)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    host = HostEventWatch(sel, device)
    watched: dict[int, int] = {}

    def unwatch() -> None:
        for fd in watched:
            sel.unregister(fd)
        watched.clear()

    try:
        while not server.finished:
            host.sync()
            ready = sel.select(host.timeout(None))
            host.run_timers()
            for key, _ in ready:
                if isinstance(key.data, HostFd):
                    key.data.watch.dispatch(key.fd)
                    continue
                if key.data is not None:
                    try:
                        os.eventfd_read(key.fd)
                    except OSError:
                        continue  # spurious wake-up
                    server.kick(key.data)
                    continue
                try:
                    data, fds, flags, _ = socket.recv_fds(sock, P.MAX_MESSAGE + 1, MAX_FDS)
                except OSError:
                    return
                if not data and not fds:
                    return  # the driver closed its end (or died)
                unwatch()  # the request may replace or close kick fds
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > P.MAX_MESSAGE:
                    close_fds(fds)
                    op = P.HEADER.unpack_from(data).op if len(data) >= P.HEADER.size else 0
                    reply = P.encode_error(op, P.ErrorCode.PROTOCOL, "message or fds truncated")
                else:
                    reply = server.handle(data, fds)
                try:
                    sock.send(reply)
                except OSError:
                    return
                for index, fd in server.kick_fds.items():
                    sel.register(fd, selectors.EVENT_READ, index)
                    watched[fd] = index
                break  # the kick fd set may have changed: select again
    finally:
        host.close()
        sel.close()
        server.close()


def load_factory(spec: str) -> Callable[..., VirtioDevice]:
    """Import ``"package.module:qualified.name"`` and return that callable."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"factory {spec!r} is not 'module:name'")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory {spec!r} is not callable")
    return obj  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the device process (see the module docstring)."""
    ap = argparse.ArgumentParser(description="pyvirtio two-process loopback: device side")
    ap.add_argument("--fd", type=int, required=True, help="connected SOCK_SEQPACKET socket")
    ap.add_argument("--factory", required=True, help="module:callable returning the device")
    ap.add_argument("--kwargs", default="{}", help="JSON object of factory keyword arguments")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="device[%(process)d] %(message)s")
    sock = socket.socket(fileno=args.fd)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object")
        device = load_factory(args.factory)(**kwargs)
        serve(sock, device)
    except Exception:  # report and exit non-zero
        _log.exception("device process failed")
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
