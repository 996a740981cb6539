"""Console device constants and wire layouts. virtio-v1.2 §5.3 "Console Device".

Device ID 3. Virtqueues (virtio-v1.2 §5.3.2 "Virtqueues"): 0 receiveq(port0),
1 transmitq(port0), 2 control receiveq, 3 control transmitq, 4 receiveq(port1),
5 transmitq(port1), ... "The port 0 receive and transmit queues always exist: other
queues only exist if VIRTIO_CONSOLE_F_MULTIPORT is set." :func:`receiveq`,
:func:`transmitq`, :func:`port_of_queue` and :func:`virtqueue_count` compute the
numbering; nothing else does.

Control messages (virtio-v1.2 §5.3.6.2 "Multiport Device Operation") are a
``struct virtio_console_control`` followed, for VIRTIO_CONSOLE_RESIZE, by a
``struct virtio_console_resize`` and, for VIRTIO_CONSOLE_PORT_NAME, by the UTF-8 name
"without a NUL terminator".
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from pyvirtio.spec.layout import WireStruct

__all__ = [
    "CONTROL_RECEIVEQ",
    "CONTROL_TRANSMITQ",
    "RECEIVEQ0",
    "TRANSMITQ0",
    "VIRTIO_CONSOLE_BAD_ID",
    "VIRTIO_CONSOLE_CONFIG",
    "VIRTIO_CONSOLE_CONTROL",
    "VIRTIO_CONSOLE_RESIZE",
    "ConsoleEvent",
    "ConsoleFeature",
    "VirtioConsoleConfig",
    "VirtioConsoleControl",
    "VirtioConsoleResize",
    "port_of_queue",
    "receiveq",
    "transmitq",
    "virtqueue_count",
]


class ConsoleFeature(IntEnum):
    """Console feature bits (virtio-v1.2 §5.3.3 "Feature bits")."""

    #: "Configuration cols and rows are valid."
    SIZE = 0
    #: "Device has support for multiple ports; max_nr_ports is valid and control
    #: virtqueues will be used."
    MULTIPORT = 1
    #: "Device has support for emergency write. Configuration field emerg_wr is valid."
    EMERG_WRITE = 2

    @property
    def mask(self) -> int:
        """This feature as a bit mask."""
        return 1 << int(self)


class ConsoleEvent(IntEnum):
    """``virtio_console_control.event`` values (virtio-v1.2 §5.3.6.2).

    The spec calls events 1 and 2 DEVICE_ADD and DEVICE_REMOVE; Linux's
    ``<linux/virtio_console.h>`` calls them PORT_ADD and PORT_REMOVE (aliases here).
    """

    #: driver -> device: "ready to receive control messages" (value 1 success, 0 failure)
    DEVICE_READY = 0
    #: device -> driver: create port ``id``
    DEVICE_ADD = 1
    #: device -> driver: remove port ``id``
    DEVICE_REMOVE = 2
    #: driver -> device: port ``id`` is ready (value 1) or failed (0)
    PORT_READY = 3
    #: device -> driver: port ``id`` is a console port
    CONSOLE_PORT = 4
    #: device -> driver: console size changed; a virtio_console_resize follows
    RESIZE = 5
    #: both ways: port ``id`` opened (value 1) or closed (0) on the sender's side
    PORT_OPEN = 6
    #: device -> driver: the port's UTF-8 name follows (no NUL)
    PORT_NAME = 7
    PORT_ADD = 1  # Linux's name for DEVICE_ADD
    PORT_REMOVE = 2  # Linux's name for DEVICE_REMOVE


#: ``VIRTIO_CONSOLE_BAD_ID`` of Linux's header: no port.
VIRTIO_CONSOLE_BAD_ID = 0xFFFFFFFF


class VirtioConsoleConfig(NamedTuple):
    """``struct virtio_console_config`` (virtio-v1.2 §5.3.4 "Device configuration
    layout")::

        struct virtio_console_config {
                le16 cols;
                le16 rows;
                le32 max_nr_ports;
                le32 emerg_wr;
        };
    """

    cols: int
    rows: int
    max_nr_ports: int
    emerg_wr: int


VIRTIO_CONSOLE_CONFIG: WireStruct[VirtioConsoleConfig] = WireStruct(
    VirtioConsoleConfig,
    [("cols", "le16"), ("rows", "le16"), ("max_nr_ports", "le32"), ("emerg_wr", "le32")],
)


class VirtioConsoleControl(NamedTuple):
    """``struct virtio_console_control`` (virtio-v1.2 §5.3.6.2)::

    struct virtio_console_control {
            le32 id;    /* Port number */
            le16 event; /* The kind of control event */
            le16 value; /* Extra information for the event */
    };
    """

    id: int
    event: int
    value: int


VIRTIO_CONSOLE_CONTROL: WireStruct[VirtioConsoleControl] = WireStruct(
    VirtioConsoleControl, [("id", "le32"), ("event", "le16"), ("value", "le16")]
)


class VirtioConsoleResize(NamedTuple):
    """``struct virtio_console_resize`` (virtio-v1.2 §5.3.6.2, after a RESIZE
    control message)::

        struct virtio_console_resize {
                le16 cols;
                le16 rows;
        };

    (Linux read ``rows`` first until "virtio_console: fix order of fields cols and
    rows" in 2023; the spec's order is the one here.)
    """

    cols: int
    rows: int


VIRTIO_CONSOLE_RESIZE: WireStruct[VirtioConsoleResize] = WireStruct(
    VirtioConsoleResize, [("cols", "le16"), ("rows", "le16")]
)

#: Queue indexes that always exist or exist with MULTIPORT (virtio-v1.2 §5.3.2).
RECEIVEQ0 = 0
TRANSMITQ0 = 1
CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3


def receiveq(port: int) -> int:
    """Index of port ``port``'s receiveq (virtio-v1.2 §5.3.2)."""
    if port < 0:
        raise ValueError(f"no port {port}")
    return RECEIVEQ0 if port == 0 else 2 * port + 2


def transmitq(port: int) -> int:
    """Index of port ``port``'s transmitq (virtio-v1.2 §5.3.2)."""
    return receiveq(port) + 1


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """``(port, is_transmitq)`` of queue ``index``; None for the control queues."""
    if index < 0:
        raise ValueError(f"no queue {index}")
    if index in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
        return None
    port = 0 if index < 2 else (index - 2) // 2
    return port, bool(index & 1)


def virtqueue_count(max_nr_ports: int, multiport: bool) -> int:
    """Queues of a device: 2 without MULTIPORT, else a pair per port plus the two
    control queues (``2 * (max_nr_ports + 1)``, as Linux's virtio_console sets up)."""
    return 2 * (max_nr_ports + 1) if multiport else 2
