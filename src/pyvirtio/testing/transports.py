"""Run one device under its driver over every transport pyvirtio has, in one call.

A device author writes the device once; :func:`open_driver` serves it over

- ``loopback``: driver and device in this process (:mod:`pyvirtio.transport.loopback`);
- ``loopback_mp``: the device in a child process, memfd guest RAM, eventfds
  (:mod:`pyvirtio.transport.loopback_mp`);
- ``pci``: a modern virtio-pci function on the in-process bus, enumerated and driven
  by the PCI driver transport (MSI-X);
- ``mmio``: a virtio-mmio (version 2) window on the in-process bus;
- ``vhost_user``: the vhost-user server in a thread of this process and the pyvirtio
  front-end over a unix socket;

and hands back the initialized driver. The device is named by a factory
``"module:callable"`` (with keyword arguments) because the two-process transport
builds it in the child; :attr:`Opened.device` is the device object wherever it lives
in this process (None for ``loopback_mp``)::

    for name in TRANSPORTS:
        with open_driver(name, "pkg.mod:MyDevice", MyDriver) as o:
            o.driver.do_something()
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyvirtio.core.device import VirtioDevice
from pyvirtio.core.driver import RingOptions, VirtioDriver
from pyvirtio.errors import ConfigurationError
from pyvirtio.transport.loopback_mp.device_side import load_factory

__all__ = ["TRANSPORTS", "Opened", "open_driver"]

#: Every transport :func:`open_driver` knows.
TRANSPORTS = ("loopback", "loopback_mp", "pci", "mmio", "vhost_user")


@dataclass
class Opened:
    """What :func:`open_driver` yields: the driver, and the device if in this process."""

    transport: str
    driver: Any
    device: VirtioDevice | None


@contextlib.contextmanager
def open_driver(
    transport: str,
    factory: str,
    driver_cls: type[VirtioDriver],
    *,
    factory_kwargs: dict[str, Any] | None = None,
    ring: RingOptions = RingOptions(),
    mem_size: int = 16 << 20,
    **driver_kw: Any,
) -> Iterator[Opened]:
    """Serve ``factory(**factory_kwargs)`` over ``transport`` and yield its
    initialized ``driver_cls`` (see the module docs). Everything is closed on exit:
    the driver, the transport, the device (:meth:`~pyvirtio.core.device.VirtioDevice.
    close`)."""
    kw = dict(factory_kwargs or {})
    if transport == "loopback_mp":
        from pyvirtio.transport.loopback_mp.driver_side import connect as mp_connect

        drv = mp_connect(
            driver_cls, factory, mem_size=mem_size, factory_kwargs=kw, ring=ring, **driver_kw
        )
        try:
            yield Opened(transport, drv, None)
        finally:
            drv.close()
            drv.transport.close()
        return
    device = load_factory(factory)(**kw)
    try:
        if transport == "loopback":
            with _loopback(device, driver_cls, ring, mem_size, driver_kw) as drv:
                yield Opened(transport, drv, device)
        elif transport in ("pci", "mmio"):
            with _bus(transport, device, driver_cls, ring, mem_size, driver_kw) as drv:
                yield Opened(transport, drv, device)
        elif transport == "vhost_user":
            with _vhost_user(device, driver_cls, ring, mem_size, driver_kw) as drv:
                yield Opened(transport, drv, device)
        else:
            raise ConfigurationError(f"unknown transport {transport!r} (one of {TRANSPORTS})")
    finally:
        device.close()


@contextlib.contextmanager
def _loopback(
    device: VirtioDevice,
    driver_cls: type[VirtioDriver],
    ring: RingOptions,
    mem_size: int,
    kw: dict[str, Any],
) -> Iterator[Any]:
    from pyvirtio.transport.loopback import connect

    drv = connect(driver_cls, device, mem_size=mem_size, ring=ring, **kw)
    try:
        yield drv
    finally:
        drv.close()
        drv.transport.close()


@contextlib.contextmanager
def _bus(
    kind: str,
    device: VirtioDevice,
    driver_cls: type[VirtioDriver],
    ring: RingOptions,
    mem_size: int,
    kw: dict[str, Any],
) -> Iterator[Any]:
    from pyvirtio.transport.inprocess_bus import InProcessBus

    bus = InProcessBus(max(mem_size, 4 << 20))
    try:
        t: Any
        if kind == "pci":
            from pyvirtio.transport.pci.device import VirtioPciFunction
            from pyvirtio.transport.pci.driver import open_virtio_pci
            from pyvirtio.transport.pci.enumerate import enumerate_pci

            bdf = bus.add_pci(VirtioPciFunction(device))
            enumerate_pci(bus)
            t = open_virtio_pci(bus, bdf)
        else:
            from pyvirtio.transport.mmio.device import VirtioMmioDevice
            from pyvirtio.transport.mmio.driver import VirtioMmioTransport

            slot = bus.add_mmio(VirtioMmioDevice(device))
            t = VirtioMmioTransport(bus, slot.base, irq=slot.irq)
        try:
            drv = driver_cls(t, ring=ring, **kw)
            drv.initialize()
            try:
                yield drv
            finally:
                drv.close()
        finally:
            t.close()
    finally:
        bus.close()


@contextlib.contextmanager
def _vhost_user(
    device: VirtioDevice,
    driver_cls: type[VirtioDriver],
    ring: RingOptions,
    mem_size: int,
    kw: dict[str, Any],
) -> Iterator[Any]:
    from pyvirtio.transport.vhost_user.frontend import connect
    from pyvirtio.transport.vhost_user.server import VhostUserServer

    with tempfile.TemporaryDirectory(prefix="pyvirtio-vu-") as tmp:
        path = os.path.join(tmp, "dev.sock")
        server = VhostUserServer(device, socket_path=path)
        thread = threading.Thread(target=server.serve, name="pyvirtio-vu-server", daemon=True)
        thread.start()
        try:
            if not server.ready.wait(10):
                raise ConfigurationError("the vhost-user server did not start")
            drv = connect(driver_cls, path, mem_size=mem_size, ring=ring, **kw)
            try:
                yield drv
            finally:
                drv.close()
                drv.transport.close()
        finally:
            server.stop()
            thread.join(10)
