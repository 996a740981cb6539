"""The device registry: one entry per device type, found by scanning ``devices/``.

Each device package (``pyvirtio/devices/<t>/__init__.py``) declares one
:class:`DeviceType` as its module attribute ``DEVICE_TYPE``: the device id and name,
the spec names of its feature bits, its configuration layout, the queue count a
front-end assumes without VHOST_USER_PROTOCOL_F_MQ, its ``pyvirtio serve <t>``
arguments and factory, the matching driver class, its ``probe --exercise`` check and
its part of the guest demo. ``serve``, ``probe`` and ``demo`` iterate over
:func:`device_types`; no shared layer names a device. Adding a device type is
``spec/<t>.py``, ``devices/<t>/`` (with its ``DEVICE_TYPE``), ``drivers/<t>/`` and
tests - nothing else (see ``docs/new-device.md``).

Discovery imports every subpackage of :mod:`pyvirtio.devices` that has a
``DEVICE_TYPE`` (in name order); :func:`register` adds one from elsewhere (a user's
own device type, a test's).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.layout import WireStruct

if TYPE_CHECKING:
    from pyvirtio.core.driver import DriverTransport, VirtioDriver
    from pyvirtio.vm.qemu import GuestResult

__all__ = [
    "DeviceType",
    "GuestDemoPart",
    "by_id",
    "by_name",
    "device_types",
    "guess_device_id",
    "int_range",
    "parse_size",
    "register",
    "unregister",
]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(text: str) -> int:
    """``1G`` / ``512M`` / ``64k`` / ``1GiB`` / ``4096`` -> bytes (binary units).

    For device types' ``serve`` arguments. Raises :class:`argparse.ArgumentTypeError`
    unless the size is a positive multiple of 512 (the sector size).
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 1G, 512M, 4096)")
    size = int(m.group(1)) << _UNITS[m.group(2).lower()]
    if size <= 0 or size % 512:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 512")
    return size


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers (any base prefix) in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is not between {lo} and {hi}")
        return value

    return parse


class GuestDemoPart(Protocol):
    """One device's part of ``pyvirtio demo guest`` (made per run, in a work folder).

    The demo starts ``pyvirtio serve <t> --socket S`` plus :meth:`serve_args`, attaches
    :attr:`qemu_device` (a vhost-user front-end, e.g. ``vhost-user-blk-pci``) with
    :attr:`qemu_options`, loads :attr:`modules` in the guest, runs :attr:`script` there
    and asks :meth:`check` what the output proves.

    Optional members a part may have: ``netdev = True`` (the front-end is QEMU's
    ``-netdev vhost-user`` with :attr:`qemu_device` on it, as for network devices),
    ``serve_prefix()`` (argv put before the ``serve`` command, e.g. ``ip netns exec
    NS``), ``backend_ready()`` (called once the back-end listens) and ``close()``
    (called at the end of the run). A factory that raises
    :class:`~pyvirtio.errors.ConfigurationError` leaves its device out of the run.
    """

    #: QEMU ``-device`` driver name of the front-end
    qemu_device: str
    #: extra ``,key=value`` options of that ``-device``
    qemu_options: str
    #: guest kernel modules the part needs
    modules: tuple[str, ...]
    #: busybox shell run in the guest (prints ``GUEST-...`` marker lines)
    script: str
    #: files placed in the guest's initramfs (path -> bytes)
    files: Mapping[str, bytes]

    def serve_args(self) -> list[str]:
        """Arguments of ``pyvirtio serve <t>`` after ``--socket``."""

    def check(self, result: GuestResult) -> dict[str, bool]:
        """What the guest's output shows, as ``{claim: held}``."""


@dataclass(frozen=True)
class DeviceType:
    """Everything the shared layers need to know about one device type."""

    #: short name: ``pyvirtio serve <name>``, ``probe --type <name>``
    name: str
    #: virtio device id (virtio-v1.2 §5 "Device Types")
    device_id: int
    #: one line for ``--help``
    summary: str
    #: spec names of the device-specific feature bits (``VIRTIO_BLK_F_RO`` ...)
    feature_names: Mapping[int, str] = field(default_factory=dict)
    #: configuration space layout (None: the device type defines none)
    config_layout: WireStruct[Any] | None = None
    #: queues a front-end sets up when the back-end has no MQ (§5.x "Virtqueues")
    fixed_queues: int = 1
    #: adds the type's own ``pyvirtio serve <name>`` arguments
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    #: builds the device from parsed ``serve`` arguments
    create: Callable[[argparse.Namespace], VirtioDevice] | None = None
    #: ``--print-capabilities`` answer (vhost-user.rst "Backend program conventions")
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    #: the driver class (imported when asked: drivers are a sibling layer)
    driver: Callable[[], type[VirtioDriver]] | None = None
    #: ``probe --exercise``: a non-destructive check with the driver over a transport
    exercise: Callable[[DriverTransport], dict[str, Any]] | None = None
    #: text lines describing an ``exercise`` result
    describe_exercise: Callable[[dict[str, Any]], list[str]] = lambda r: []
    #: True if what a vhost-user back-end offers looks like this type (features
    #: without the transport range, config prefix or None, GET_QUEUE_NUM or None)
    guess: Callable[[int, bytes | None, int | None], bool] | None = None
    #: a note shown beside a decoded configuration field (e.g. capacity in MiB)
    config_note: Callable[[str, int], str] = lambda name, value: ""
    #: this type's part of the guest demo, made for a work folder and the demo's
    #: arguments (None: none)
    demo: Callable[[str, argparse.Namespace], GuestDemoPart] | None = None
    #: more devices served beside the main one by the same ``serve`` process, each at
    #: its own vhost-user socket path (e.g. ports of one in-process switch)
    companions: Callable[[argparse.Namespace], list[tuple[str, VirtioDevice]]] = lambda args: []
    #: ``pyvirtio demo loopback``: this type and its driver in two processes; gets
    #: the demo's arguments, returns the exit status (None: none)
    loopback_demo: Callable[[argparse.Namespace], int] | None = None

    def driver_class(self) -> type[VirtioDriver]:
        """The matching driver class."""
        if self.driver is None:
            raise ConfigurationError(f"no pyvirtio driver for {self.name} devices")
        return self.driver()


_REGISTRY: dict[str, DeviceType] = {}
_DISCOVERED = False


def register(entry: DeviceType) -> DeviceType:
    """Add ``entry`` (its name and device id must be new); returns it."""
    for other in _REGISTRY.values():
        if other.name == entry.name or other.device_id == entry.device_id:
            if other is entry:
                return entry
            raise ConfigurationError(
                f"device type {entry.name!r} (id {entry.device_id}) clashes with "
                f"{other.name!r} (id {other.device_id})"
            )
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove the device type called ``name`` (no error if there is none)."""
    _discover()
    _REGISTRY.pop(name, None)


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import pyvirtio.devices as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        entry = getattr(module, "DEVICE_TYPE", None)
        if isinstance(entry, DeviceType):
            register(entry)


def device_types() -> list[DeviceType]:
    """Every registered device type, in name order."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def by_name(name: str) -> DeviceType:
    """The device type called ``name``; :class:`ConfigurationError` if none is."""
    _discover()
    entry = _REGISTRY.get(name)
    if entry is None:
        known = ", ".join(e.name for e in device_types())
        raise ConfigurationError(f"unknown device type {name!r} (known: {known})")
    return entry


def by_id(device_id: int) -> DeviceType | None:
    """The device type with virtio device id ``device_id``, or None."""
    return next((e for e in device_types() if e.device_id == device_id), None)


#: virtio-v1.2 §6 "Reserved Feature Bits": bits 24 to 41 are the transport's and the
#: rings', not the device type's
_TRANSPORT_BITS = ((1 << 42) - 1) & ~((1 << 24) - 1)


def guess_device_id(features: int, config: bytes | None, num_queues: int | None = None) -> int:
    """Guess the device type of a vhost-user back-end (0 if unsure).

    vhost-user never says which device a back-end serves; this asks each registered
    type whether what the back-end offers looks like it (the ``guess`` of each
    :class:`DeviceType`, given the device-type feature bits only). ``features`` is
    the GET_FEATURES answer without the vhost bits; ``config`` the first bytes of the
    configuration space (None: no config access or refused); ``num_queues`` the
    GET_QUEUE_NUM answer if any. Exactly one type must claim it.
    """
    specific = features & ~_TRANSPORT_BITS
    matches = [
        e for e in device_types() if e.guess is not None and e.guess(specific, config, num_queues)
    ]
    return matches[0].device_id if len(matches) == 1 else 0
