"""The device-side register model every device-side transport wraps around a device.

:class:`DeviceState` is what a driver sees of a device through any transport, minus
the transport's encoding: the device status field and its state machine, feature
bits (64-bit, with 32-bit select windows), the configuration space with its
generation counter, and the per-queue registers (size, ring addresses, enable). The
loopback transports use it directly; the PCI, MMIO and vhost-user device sides map
their registers or messages onto the same methods.

It is the :class:`~pyvirtio.core.device.DeviceHost` of the device it carries: the
device's used buffer and configuration change notifications are forwarded to the
callbacks :attr:`DeviceState.on_used` and :attr:`DeviceState.on_config` that the
transport sets, gated by the status as the spec requires.

Driver misuse of a register never raises: it is answered as the spec says (the
write is ignored, FEATURES_OK stays clear, or DEVICE_NEEDS_RESET is set) and
recorded as a :class:`~pyvirtio.errors.DriverError` carrying the broken clause in
:attr:`DeviceState.violations` (a bounded log) and in the device's metrics. The
only exceptions that escape are bugs of the device model itself.

Choices the spec leaves open, documented here once:

- Configuration space reads past its end read as zero bytes (like an unimplemented
  register) and are logged as a violation; a single access is capped at
  :data:`MAX_CONFIG_ACCESS` bytes. Writes that do not fit are ignored entirely.
- The configuration generation is an unbounded, monotonic integer (transports
  truncate it to their register width). It is bumped when the device reports a
  change, at most once between two configuration reads (the coalescing that
  virtio-v1.2 §4.1.4.3.1 recommends so an 8-bit counter cannot wrap back to a value
  the driver saw), and never goes back, not even across a reset.
- Configuration change notifications are only sent once DRIVER_OK is set (a change
  before that is still visible through the generation counter).
- A status write that clears a bit or adds bits out of order is ignored as a whole
  (except that FAILED is always honoured).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pyvirtio.core.device import VirtioDevice, strip_traceback
from pyvirtio.errors import ConfigurationError, DriverError, QueueBrokenError, VirtioError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature, has
from pyvirtio.spec.ring import PACKED_MAX_QUEUE_SIZE, SPLIT_MAX_QUEUE_SIZE
from pyvirtio.spec.status import DeviceStatus
from pyvirtio.virtqueue import make_device_queue
from pyvirtio.virtqueue.common import DeviceVirtqueue, QueueAddresses

__all__ = ["MAX_CONFIG_ACCESS", "DeviceState"]

_log = logging.getLogger(__name__)

#: Largest single configuration space access served (bytes); larger reads are clamped.
MAX_CONFIG_ACCESS = 4096

#: How many 32-bit feature words the select windows expose (128 feature bits).
FEATURE_WORDS = 4

#: Violations kept in :attr:`DeviceState.violations` (older ones are dropped).
VIOLATION_LOG = 64

_ST_STATUS = 'virtio-v1.2 §2.1.1 "Driver Requirements: Device Status Field"'
_ST_INIT = 'virtio-v1.2 §3.1.1 "Driver Requirements: Device Initialization"'
_ST_LEGACY_INIT = 'virtio-v1.2 §3.1.2 "Legacy Interface: Device Initialization"'
_ST_FEATURES = 'virtio-v1.2 §2.2.1 "Driver Requirements: Feature Bits"'
_ST_RESERVED = 'virtio-v1.2 §6.1 "Driver Requirements: Reserved Feature Bits"'
_ST_CONFIG = 'virtio-v1.2 §2.5.1 "Driver Requirements: Device Configuration Space"'
_ST_VQ = 'virtio-v1.2 §2.6 "Virtqueues"'
_ST_VQ_RESET = 'virtio-v1.2 §2.6.1 "Virtqueue Reset"'
_ST_SPLIT = 'virtio-v1.2 §2.7 "Split Virtqueues"'
_ST_PCI_COMMON = (
    'virtio-v1.2 §4.1.4.3.2 "Driver Requirements: Common configuration structure layout"'
)

_S = DeviceStatus
#: Status bits the driver may set (DEVICE_NEEDS_RESET belongs to the device).
_DRIVER_BITS = _S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK | _S.DRIVER_OK | _S.FAILED
#: The order initialization steps are completed in (virtio-v1.2 §3.1.1).
_ORDER_MODERN = (_S.ACKNOWLEDGE, _S.DRIVER, _S.FEATURES_OK, _S.DRIVER_OK)
_ORDER_LEGACY = (_S.ACKNOWLEDGE, _S.DRIVER, _S.DRIVER_OK)


@dataclass
class _QueueRegs:
    """Driver-visible registers of one virtqueue."""

    max_size: int
    #: None until the driver writes a size: the queue then has its maximum size
    size: int | None
    addrs: QueueAddresses
    enabled: bool = False


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class DeviceState:
    """The device side of a transport: registers and state machine around a device.

    ``mem`` is the guest RAM the device's rings live in (it may be set later, e.g.
    by vhost-user's memory table, through the :attr:`mem` attribute). ``legacy``
    selects the legacy (virtio 0.9.5) interface: 32 feature bits, no VERSION_1, no
    FEATURES_OK step, and the device may be used before DRIVER_OK
    (virtio-v1.2 §3.1.2 "Legacy Interface: Device Initialization").

    ``on_used(queue_index)`` and ``on_config()`` are called to deliver used buffer
    and configuration change notifications; they may run on whatever thread the
    device model notifies from.

    Not thread-safe as a whole: register methods are called from one thread (the
    transport's); the :class:`~pyvirtio.core.device.DeviceHost` methods may be
    called by a device backend from another thread.
    """

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory | None = None,
        *,
        legacy: bool = False,
        on_used: Callable[[int], None] | None = None,
        on_config: Callable[[], None] | None = None,
    ) -> None:
        if device.host is not None and device.host is not self:
            raise ConfigurationError("the device is already attached to a transport")
        self.device = device
        self.mem = mem
        self.legacy = legacy
        self.on_used = on_used
        self.on_config = on_config
        #: the most recent driver violations (bounded), newest last
        self.violations: deque[DriverError] = deque(maxlen=VIOLATION_LOG)
        #: how many violations were seen in total
        self.violation_count = 0
        #: why DEVICE_NEEDS_RESET was set (None while it is not)
        self.needs_reset_reason: VirtioError | None = None
        self._lock = threading.Lock()
        self._status = 0
        self._driver_features = 0
        self._features = 0
        self._activated = False
        #: queues notified before DRIVER_OK (a violation): served at activation
        self._early_notified: set[int] = set()
        self._generation = 0
        self._config_dirty = False
        self._queues = [self._fresh_queue(i) for i in range(device.num_queues)]
        device.host = self

    # -- bookkeeping --------------------------------------------------------------

    def _fresh_queue(self, index: int) -> _QueueRegs:
        cap = PACKED_MAX_QUEUE_SIZE if not self.legacy else SPLIT_MAX_QUEUE_SIZE
        qmax = max(0, min(self.device.queue_max_size, cap))
        return _QueueRegs(max_size=qmax, size=None, addrs=QueueAddresses(0, 0, 0))

    def _violation(self, message: str, clause: str) -> DriverError:
        err = DriverError(message, clause)
        self.violations.append(err)
        self.violation_count += 1
        self.device.metrics.error("driver_violation")
        _log.debug("driver violation: %s", err)
        return err

    def _queue(self, index: int, what: str) -> _QueueRegs | None:
        if 0 <= index < len(self._queues):
            return self._queues[index]
        self._violation(f"{what}: queue {index} does not exist", _ST_VQ)
        return None

    def close(self) -> None:
        """Reset the device and detach from it (the transport is going away)."""
        self.reset()
        if self.device.host is self:
            self.device.host = None

    # -- device status (virtio-v1.2 §2.1) ---------------------------------------------

    @property
    def status(self) -> int:
        """The device status field as the driver reads it."""
        return self._status

    def read_status(self) -> int:
        """Read the device status field (same as :attr:`status`)."""
        return self._status

    def write_status(self, value: int) -> None:
        """A driver write of the device status field.

        Writing 0 resets the device (virtio-v1.2 §2.4 "Device Reset"). Otherwise the
        driver may only add bits, in the order of virtio-v1.2 §3.1.1 (ACKNOWLEDGE,
        DRIVER, FEATURES_OK, DRIVER_OK; no FEATURES_OK for legacy): "The driver MUST
        NOT clear a device status bit" (§2.1.1). FAILED may be set at any time;
        after it only a reset is accepted ("If the driver sets the FAILED bit, the
        driver MUST later reset the device before attempting to re-initialize").

        FEATURES_OK is only set if the driver's features are acceptable
        (:meth:`_accept_features`); otherwise it stays clear, and so does anything
        after it in the same write, for the driver's re-read to see. DRIVER_OK makes
        the device live: virtqueues are created and the device activated.
        """
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self._status
        if value & ~_DRIVER_BITS & ~_S.DEVICE_NEEDS_RESET:
            self._violation(f"status write {value:#x} sets undefined bits", _ST_STATUS)
        value &= _DRIVER_BITS  # DEVICE_NEEDS_RESET is the device's: ignore the driver's copy
        if self.legacy and value & _S.FEATURES_OK:
            self._violation("FEATURES_OK written through the legacy interface", _ST_LEGACY_INIT)
            value &= ~_S.FEATURES_OK
        driver_old = old & _DRIVER_BITS
        if driver_old & ~value:
            self._violation(
                f"status write {value:#x} clears bits of {driver_old:#x}: the driver "
                "MUST NOT clear a device status bit",
                _ST_STATUS,
            )
            return
        new = value & ~driver_old
        if not new:
            return
        if (old | value) & _S.FAILED:
            if new & ~_S.FAILED:
                self._violation(
                    "status bits set with or after FAILED: the driver MUST reset the "
                    "device before attempting to re-initialize",
                    _ST_STATUS,
                )
            with self._lock:
                self._status |= _S.FAILED
            return
        order = _ORDER_LEGACY if self.legacy else _ORDER_MODERN
        seen_clear = False
        for bit in order:
            if value & bit and seen_clear:
                self._violation(
                    f"status write {value:#x} skips a step of the initialization sequence",
                    _ST_INIT,
                )
                return
            seen_clear = seen_clear or not value & bit
        for bit in order:
            if not new & bit:
                continue
            if bit == _S.FEATURES_OK and not self._accept_features():
                return
            with self._lock:
                self._status |= bit
            if bit == _S.DRIVER_OK:
                self._activate()

    def reset(self) -> None:
        """Device reset (virtio-v1.2 §2.4 "Device Reset").

        "A device MUST reinitialize device status to 0 after receiving a reset" and
        "MUST NOT send notifications or interact with the queues" afterwards: the
        device forgets its features and queues (old queue objects are marked broken
        so a late completion from a backend cannot touch them), the queue registers
        return to their defaults. The configuration generation is kept (monotonic).
        """
        device = self.device
        with device.lock:
            # host I/O in flight finishes before the queues go (QEMU drains too)
            device.guarded("quiesce", device.quiesce)
            stale = QueueBrokenError("device reset")
            for vq in device.queues:
                if vq is not None and vq.broken_reason is None:
                    vq.broken_reason = stale
        with self._lock:
            self._status = 0
        self._driver_features = 0
        self._features = 0
        self._activated = False
        self._early_notified = set()
        self.needs_reset_reason = None
        self._queues = [self._fresh_queue(i) for i in range(self.device.num_queues)]
        device.guarded("reset", device.reset)

    # -- feature bits (virtio-v1.2 §2.2) ----------------------------------------------

    @property
    def device_features(self) -> int:
        """Every feature bit offered (32 bits, without VERSION_1, for legacy)."""
        offered = self.device.device_features()
        if self.legacy:
            offered &= 0xFFFFFFFF
        return offered

    @property
    def driver_features(self) -> int:
        """The feature bits as the driver last wrote them (validated at FEATURES_OK)."""
        return self._driver_features

    @property
    def negotiated_features(self) -> int:
        """The features in force: set at FEATURES_OK (legacy: when the device goes
        live); 0 before."""
        return self._features

    def _features_locked(self) -> bool:
        if self.legacy:
            return self._activated
        return bool(self._status & _S.FEATURES_OK)

    def write_driver_features(self, features: int) -> None:
        """The driver writes the feature bits it accepts (all of them at once).

        "The driver MUST NOT accept new feature bits after" FEATURES_OK
        (virtio-v1.2 §3.1.1 step 5): such a write is ignored. Bits the device did not
        offer are kept as written and refused at FEATURES_OK.
        """
        if self._features_locked():
            self._violation("driver features written after FEATURES_OK", _ST_INIT)
            return
        limit = 32 if self.legacy else 32 * FEATURE_WORDS
        self._driver_features = features & ((1 << limit) - 1)

    def read_device_features_word(self, select: int) -> int:
        """32 offered feature bits starting at bit ``32 * select`` (PCI/MMIO windows;
        0 for a select beyond the defined bits, virtio-v1.2 §4.1.4.3.1)."""
        if not 0 <= select < FEATURE_WORDS:
            return 0
        return self.device_features >> (32 * select) & 0xFFFFFFFF

    def read_driver_features_word(self, select: int) -> int:
        """32 bits of the driver features starting at bit ``32 * select``."""
        if not 0 <= select < FEATURE_WORDS:
            return 0
        return self._driver_features >> (32 * select) & 0xFFFFFFFF

    def write_driver_features_word(self, select: int, value: int) -> None:
        """Write 32 bits of the driver features starting at bit ``32 * select``.

        A select past the defined words is ignored (no feature lives there).
        """
        if not 0 <= select < FEATURE_WORDS or (self.legacy and select != 0):
            self._violation(f"driver feature select {select} is out of range", _ST_FEATURES)
            return
        shift = 32 * select
        mask = 0xFFFFFFFF << shift
        self.write_driver_features(self._driver_features & ~mask | (value & 0xFFFFFFFF) << shift)

    def _accept_features(self) -> bool:
        """FEATURES_OK time: may the driver's features be used?

        virtio-v1.2 §2.2.2: the device "SHOULD accept any valid subset of features
        the driver accepts, otherwise it MUST fail to set the FEATURES_OK device
        status bit". Refused here: a bit that was not offered (§2.2.1 "The driver
        MUST NOT accept a feature which the device did not offer"), a modern driver
        without VIRTIO_F_VERSION_1 (§6.1 "A driver MUST accept VIRTIO_F_VERSION_1 if
        it is offered"; §6.2 lets the device refuse to operate), and whatever the
        device's :meth:`~pyvirtio.core.device.VirtioDevice.validate_features` refuses.
        """
        wanted = self._driver_features
        offered = self.device_features
        if wanted & ~offered:
            self._violation(
                f"driver accepted feature bits {wanted & ~offered:#x} that were not offered",
                _ST_FEATURES,
            )
            return False
        if has(offered, Feature.VERSION_1) and not has(wanted, Feature.VERSION_1):
            self._violation("modern driver did not accept VIRTIO_F_VERSION_1", _ST_RESERVED)
            return False
        if not self.device.validate_features(wanted):
            return False
        self._features = wanted
        self.device.features = wanted
        return True

    # -- device configuration space (virtio-v1.2 §2.5) -----------------------------------

    @property
    def config_generation(self) -> int:
        """The configuration generation counter (monotonic; never reset)."""
        return self._generation

    def config_size(self) -> int:
        """Size of the device configuration space in bytes."""
        return len(self.device.config_bytes())

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of configuration space at ``offset``.

        Always allowed ("The device MUST allow reading of any device-specific
        configuration field before FEATURES_OK", §2.5.2). Bytes past the end read as
        zero (a violation is logged); ``size`` is clamped to :data:`MAX_CONFIG_ACCESS`.
        """
        size = max(0, min(size, MAX_CONFIG_ACCESS))
        if offset < 0:
            self._violation(f"configuration read at negative offset {offset}", _ST_CONFIG)
            return bytes(size)
        # a change the device makes while we read must still show in the generation
        self._config_dirty = False
        with self.device.lock:
            space = self.device.config_bytes()
        data = space[offset : offset + size]
        if len(data) < size:
            self._violation(
                f"configuration read {offset}+{size} past the end ({len(space)} bytes)",
                _ST_CONFIG,
            )
            data += bytes(size - len(data))
        return data

    def write_config(self, offset: int, data: bytes) -> None:
        """Write configuration space; ignored if it does not fit or comes too early.

        A modern driver "MAY read (but MUST NOT write) the device-specific
        configuration fields" before FEATURES_OK (virtio-v1.2 §3.1.1 step 4); a legacy
        device must accept such writes (§3.1.2).
        """
        if not self.legacy and not self._status & _S.FEATURES_OK:
            self._violation("configuration written before FEATURES_OK", _ST_INIT)
            return
        if offset < 0 or len(data) > MAX_CONFIG_ACCESS or offset + len(data) > self.config_size():
            self._violation(
                f"configuration write {offset}+{len(data)} outside the configuration space",
                _ST_CONFIG,
            )
            return
        self.device.guarded("configuration write", self.device.write_config, offset, bytes(data))

    def _bump_generation(self) -> None:
        with self._lock:
            if not self._config_dirty:
                self._generation += 1
                self._config_dirty = True

    # -- virtqueues (virtio-v1.2 §2.6) -------------------------------------------------

    @property
    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        return len(self._queues)

    def _packed(self) -> bool:
        return not self.legacy and has(self._features, Feature.RING_PACKED)

    def queue_max_size(self, index: int) -> int:
        """The largest size queue ``index`` accepts; 0 if it does not exist.

        Unless VIRTIO_F_RING_PACKED was negotiated this is a power of two ("the
        device MUST present either a value of 0 or a power of 2", §4.1.4.3.1).
        """
        if not 0 <= index < len(self._queues):
            return 0
        qmax = self._queues[index].max_size
        return qmax if self._packed() else _floor_pow2(qmax)

    def queue_size(self, index: int) -> int:
        """The current size of queue ``index`` (its maximum until the driver writes)."""
        if not 0 <= index < len(self._queues):
            return 0
        size = self._queues[index].size
        return self.queue_max_size(index) if size is None else size

    def queue_addresses(self, index: int) -> QueueAddresses:
        """Where the driver said the three areas of queue ``index`` are."""
        if not 0 <= index < len(self._queues):
            return QueueAddresses(0, 0, 0)
        return self._queues[index].addrs

    def queue_enabled(self, index: int) -> bool:
        """True if queue ``index`` is enabled (PCI ``queue_enable``, MMIO ``QueueReady``)."""
        return 0 <= index < len(self._queues) and self._queues[index].enabled

    def device_queue(self, index: int) -> DeviceVirtqueue | None:
        """The live device-side virtqueue ``index`` (None before it is live)."""
        if not 0 <= index < len(self.device.queues):
            return None
        return self.device.queues[index]

    def set_queue_size(self, index: int, size: int) -> None:
        """The driver chooses the size of queue ``index``.

        The register keeps what was written (16 bits), so the driver reads back its
        own value; a size that is not usable (0, above the maximum, not a power of two
        for a split ring: §4.1.4.3.2 "the driver MUST NOT write a value which is not a
        power of 2") is logged and makes :meth:`enable_queue` refuse the queue.
        """
        q = self._queue(index, "queue size write")
        if q is None:
            return
        if q.enabled:
            self._violation(f"queue {index} size written while enabled", _ST_PCI_COMMON)
            return
        size &= 0xFFFF
        q.size = size
        problem = self._size_problem(index, size)
        if problem:
            self._violation(problem, _ST_PCI_COMMON)

    def _size_problem(self, index: int, size: int) -> str | None:
        qmax = self.queue_max_size(index)
        if not 1 <= size <= qmax:
            return f"queue {index} size {size} outside 1..{qmax}"
        if not self._packed() and not _is_pow2(size):
            return f"split queue {index} size {size} is not a power of 2"
        return None

    def set_queue_addresses(self, index: int, addrs: QueueAddresses) -> None:
        """The driver places the Descriptor, Driver and Device Areas of queue ``index``
        ("The driver MUST configure the other virtqueue fields before enabling the
        virtqueue", §4.1.4.3.2: writes to an enabled queue are ignored)."""
        q = self._queue(index, "queue address write")
        if q is None:
            return
        if q.enabled:
            self._violation(f"queue {index} addresses written while enabled", _ST_PCI_COMMON)
            return
        q.addrs = addrs

    def enable_queue(self, index: int) -> None:
        """Enable queue ``index`` (PCI ``queue_enable`` = 1, MMIO ``QueueReady`` = 1,
        legacy PFN write). The ring is checked and goes live at DRIVER_OK, or at once
        if the device is already live (a re-enabled queue after a queue reset)."""
        q = self._queue(index, "queue enable")
        if q is None:
            return
        if q.enabled:
            return
        if not self.legacy and not self._status & _S.FEATURES_OK:
            self._violation(f"queue {index} enabled before FEATURES_OK", _ST_INIT)
            return
        size = self.queue_size(index)
        problem = self._size_problem(index, size)
        if problem:
            self._violation(f"queue {index} not enabled: {problem}", _ST_SPLIT)
            return
        q.size = size
        q.enabled = True
        if self._activated and not self._status & _S.DEVICE_NEEDS_RESET:
            vq = self._create_queue(index)
            if vq is not None:
                with self.device.lock:
                    self.device.attach_queue(index, vq)

    def disable_queue(self, index: int) -> None:
        """Stop using queue ``index`` (MMIO ``QueueReady`` = 0: "The device MUST NOT
        access virtqueue contents when QueueReady is zero", §4.2.2.1). The registers
        keep their values. PCI forbids writing 0 to ``queue_enable``; the PCI
        transport treats that write as a violation instead of calling this."""
        q = self._queue(index, "queue disable")
        if q is None or not q.enabled:
            return
        q.enabled = False
        self._drop_queue(index, "queue disabled")

    def reset_queue(self, index: int) -> None:
        """Reset queue ``index`` alone (virtio-v1.2 §2.6.1 "Virtqueue Reset"), allowed
        once VIRTIO_F_RING_RESET is negotiated.

        "After a queue has been reset by the driver, the device MUST NOT execute any
        requests from that virtqueue, or notify the driver for it", and "MUST reset
        any state of a virtqueue to the default state": the registers return to their
        defaults and a later :meth:`enable_queue` starts a fresh ring.
        """
        q = self._queue(index, "queue reset")
        if q is None:
            return
        if not has(self._features, Feature.RING_RESET):
            self._violation(
                f"queue {index} reset without VIRTIO_F_RING_RESET negotiated", _ST_VQ_RESET
            )
            return
        self._drop_queue(index, "queue reset")
        self._queues[index] = self._fresh_queue(index)

    def setup_queue(self, index: int, size: int, addrs: QueueAddresses) -> None:
        """Size, addresses and enable of queue ``index`` in one call (loopback)."""
        self.set_queue_size(index, size)
        self.set_queue_addresses(index, addrs)
        self.enable_queue(index)

    def _drop_queue(self, index: int, why: str) -> None:
        if index < len(self.device.queues):
            with self.device.lock:
                vq = self.device.queues[index]
                if vq is not None:
                    self.device.guarded("quiesce", self.device.quiesce)
                    if vq.broken_reason is None:
                        vq.broken_reason = QueueBrokenError(why)
                self.device.detach_queue(index)

    def _create_queue(self, index: int) -> DeviceVirtqueue | None:
        """Build the device side of queue ``index``; a bad ring placement (outside
        guest RAM, misaligned, bad size) sets DEVICE_NEEDS_RESET instead."""
        q = self._queues[index]
        try:
            if self.mem is None:
                raise DriverError(f"queue {index} enabled but no guest memory is known", _ST_VQ)
            size = self.queue_size(index)
            return make_device_queue(self.mem, size, q.addrs, self._features, index=index)
        except VirtioError as e:
            self.needs_reset(e)
        except ValueError as e:
            self.needs_reset(DriverError(f"queue {index}: {e}", _ST_VQ))
        return None

    def _activate(self) -> None:
        """The device goes live: create every enabled queue, then ``activate``."""
        if self._activated:
            return
        if self.legacy:
            offered = self.device_features
            wanted = self._driver_features
            if wanted & ~offered:
                self._violation(
                    f"legacy driver accepted bits {wanted & ~offered:#x} never offered",
                    _ST_FEATURES,
                )
            wanted &= offered
            self._features = wanted
            self.device.features = wanted
            if not self.device.validate_features(wanted):
                self._activated = True
                self.needs_reset(
                    DriverError("the device refuses the legacy driver's features", _ST_FEATURES)
                )
                return
        self._activated = True
        queues = [self._create_queue(i) if q.enabled else None for i, q in enumerate(self._queues)]
        if self._status & _S.DEVICE_NEEDS_RESET:
            return
        self.device.guarded("activate", self.device.activate, self._features, queues)
        # notifications that came before DRIVER_OK (a violation, logged when they came:
        # Linux's virtio_balloon kicks its statsq in probe, before virtio_device_ready)
        # are served now, as QEMU's own devices do, rather than lost
        early, self._early_notified = sorted(self._early_notified), set()
        for index in early:
            if self._status & _S.DEVICE_NEEDS_RESET:
                return
            if self.device.queues[index] is not None:
                self.device.queue_notified(index)

    # -- notifications (virtio-v1.2 §2.3) ---------------------------------------------

    def notify(self, index: int, next_off: int | None = None, next_wrap: int = 0) -> None:
        """An available buffer notification for queue ``index``.

        With VIRTIO_F_NOTIFICATION_DATA the transport passes the notification's
        ``next_off`` and ``next_wrap`` (virtio-v1.2 §2.9 "Driver Notifications"): the
        live queue records them and checks them against the ring
        (:meth:`~pyvirtio.virtqueue.common.DeviceVirtqueue.driver_notified`); an
        inconsistent statement is logged as a violation and the queue is still served
        from what the ring shows.

        The device runs only when live: "The driver MUST NOT send any buffer available
        notifications to the device before setting DRIVER_OK" (§3.1.1; a legacy driver
        may, §3.1.2, and then the device goes live now), not after DEVICE_NEEDS_RESET
        or FAILED. A :class:`~pyvirtio.errors.VirtioError` raised by the device model
        (a driver violation it did not catch), or any other exception (a bug of the
        model), sets DEVICE_NEEDS_RESET through the device's failure path
        (:meth:`~pyvirtio.core.device.VirtioDevice.fail`).
        """
        if not 0 <= index < len(self._queues):
            self._violation(f"notification for queue {index} that does not exist", _ST_VQ)
            return
        status = self._status
        if status & (_S.DEVICE_NEEDS_RESET | _S.FAILED):
            return
        if not self._activated:
            if self.legacy and status & _S.DRIVER:
                self._activate()
            else:
                self._violation(f"notification for queue {index} before DRIVER_OK", _ST_INIT)
                self._early_notified.add(index)
                return
            if self._status & _S.DEVICE_NEEDS_RESET:
                return
        vq = self.device.queues[index]
        if vq is None:
            return
        if next_off is not None:
            err = vq.driver_notified(next_off, next_wrap)
            if err is not None:
                self._violation(err.message, err.clause or _ST_VQ)
        self.device.queue_notified(index)

    # -- DeviceHost (what the device calls) ----------------------------------------------

    def notify_used(self, queue_index: int) -> None:
        """The device used buffers of ``queue_index``: send a used buffer notification
        if the device is live ("The device MUST NOT ... send any used buffer
        notifications to the driver before DRIVER_OK", §2.1.2)."""
        if not self._activated or self._status == 0:
            return
        cb = self.on_used
        if cb is not None:
            cb(queue_index)

    def notify_config(self) -> None:
        """The device's configuration changed: bump the generation (§2.5) and send a
        configuration change notification once DRIVER_OK is set."""
        self._bump_generation()
        if self._status & _S.DRIVER_OK:
            cb = self.on_config
            if cb is not None:
                cb()

    def needs_reset(self, reason: VirtioError) -> None:
        """Set DEVICE_NEEDS_RESET (virtio-v1.2 §2.1.2): "If DRIVER_OK is set, after it
        sets DEVICE_NEEDS_RESET, the device MUST send a device configuration change
        notification to the driver". Ignored while the device is reset (status 0)
        or already needs a reset."""
        _log.warning("device needs reset: %s", reason)
        strip_traceback(reason)
        with self._lock:
            if self._status == 0 or self._status & _S.DEVICE_NEEDS_RESET:
                return
            self._status |= _S.DEVICE_NEEDS_RESET
            self.needs_reset_reason = reason
        self.device.metrics.error("needs_reset")
        self.notify_config()
