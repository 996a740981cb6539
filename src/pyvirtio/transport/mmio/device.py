"""Device side of virtio over MMIO: the register window of one virtio-mmio device.

:class:`VirtioMmioDevice` decodes the registers of virtio-v1.2 §4.2.2 "MMIO Device
Register Layout" (``version=2``) or of the legacy layout of §4.2.4 "Legacy
interface" (``version=1``: GuestPageSize, QueueAlign and QueuePFN instead of
QueueReady and the 64-bit area addresses, no ConfigGeneration) onto a
:class:`~pyvirtio.core.device_state.DeviceState`, which holds every virtio
semantic. The interrupt line is asserted while InterruptStatus is non-zero.

Register misuse never raises. The driver "MUST NOT write to the read-only registers
(direction R) and MUST NOT read from the write-only registers (direction W)" and
"MUST only use 32 bit wide and aligned reads and writes to access the control
registers" (§4.2.2.2): such an access is ignored (a read returns 0) and logged in
``state.violations``.

Decisions the spec leaves open:

- No shared memory regions: SHMLenLow/High and SHMBaseLow/High read all ones for
  every SHMSel ("a length of -1" / "a base address of 0xffffffffffffffff").
- VIRTIO_F_RING_RESET is offered on version 2 (``ring_reset``); a queue reset
  completes at once, so QueueReset always reads 0.
- VIRTIO_F_NOTIFICATION_DATA is offered on version 2 (``notification_data``).
  Negotiated, QueueNotify takes ``vq_index | next_off << 16 | next_wrap << 31``
  (§4.2.2, §4.2.3.3): ``vq_index`` selects the queue and ``next_off``/``next_wrap``
  go to it, which checks them against the ring (an inconsistent statement is logged,
  the ring is still served). Otherwise QueueNotify takes the queue index. Every
  QueueNotify write is kept in ``state.notify_writes`` (bounded).
  VIRTIO_F_NOTIF_CONFIG_DATA is not offered.
- A reset clears the feature and queue selectors; GuestPageSize survives it (Linux
  writes it once, at probe time, before resetting the device); QueueAlign returns to
  4096.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.transport.device_state import NotifyWrite, TransportDeviceState
from pyvirtio.transport.mmio.spec import (
    MMIO_V1_REGISTERS,
    MMIO_V2_REGISTERS,
    VIRTIO_MMIO_CONFIG,
    VIRTIO_MMIO_DEFAULT_PAGE_SIZE,
    VIRTIO_MMIO_DEFAULT_QUEUE_ALIGN,
    VIRTIO_MMIO_INT_MASK,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_REG_WIDTH,
    VIRTIO_MMIO_SHM_ABSENT,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_VERSION_LEGACY,
    VIRTIO_MMIO_WINDOW_SIZE,
    MmioInterrupt,
    MmioReg,
    MmioRegister,
)
from pyvirtio.transport.pci.spec import legacy_vring_addresses
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = ["VirtioMmioDevice"]

_ST_LAYOUT = 'virtio-v1.2 §4.2.2.2 "Driver Requirements: MMIO Device Register Layout"'
_ST_NOTIFY = 'virtio-v1.2 §4.2.3.3 "Available Buffer Notifications"'
_ST_LEGACY = 'virtio-v1.2 §4.2.4 "Legacy interface"'

_NOOP_IRQ: Callable[[bool], None] = lambda level: None  # noqa: E731


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class VirtioMmioDevice:
    """One virtio-mmio device: a register window of
    :data:`~pyvirtio.transport.mmio.spec.VIRTIO_MMIO_WINDOW_SIZE` bytes.

    ``version`` 2 is the current interface, 1 the legacy one (the device is then
    driven through the legacy interface: 32 feature bits, no FEATURES_OK).
    ``ring_reset`` offers VIRTIO_F_RING_RESET and ``notification_data``
    VIRTIO_F_NOTIFICATION_DATA (version 2 only).
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        version: int = VIRTIO_MMIO_VERSION,
        ring_reset: bool = True,
        notification_data: bool = True,
        mem: GuestMemory | None = None,
    ) -> None:
        if version not in (VIRTIO_MMIO_VERSION, VIRTIO_MMIO_VERSION_LEGACY):
            raise ConfigurationError(f"virtio-mmio version must be 1 or 2, not {version}")
        if len(device.config_bytes()) > VIRTIO_MMIO_WINDOW_SIZE - VIRTIO_MMIO_CONFIG:
            raise ConfigurationError("device configuration does not fit the MMIO window")
        self.version = version
        self.legacy = version == VIRTIO_MMIO_VERSION_LEGACY
        self.device = device
        self.state = TransportDeviceState(device, mem, legacy=self.legacy)
        if ring_reset and not self.legacy:
            self.state.transport_features |= Feature.RING_RESET.mask
        if notification_data and not self.legacy:
            self.state.transport_features |= Feature.NOTIFICATION_DATA.mask
        self.state.on_used = self._on_used
        self.state.on_config = self._on_config
        self._set_irq: Callable[[bool], None] = _NOOP_IRQ
        regs = MMIO_V1_REGISTERS if self.legacy else MMIO_V2_REGISTERS
        self._regs: dict[int, MmioRegister] = {r.offset: r for r in regs}
        self._guest_page_size = VIRTIO_MMIO_DEFAULT_PAGE_SIZE
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._dfsel = 0
        self._gfsel = 0
        self._queue_sel = 0
        self._shm_sel = 0
        self._int_status = 0
        self._queue_align = [VIRTIO_MMIO_DEFAULT_QUEUE_ALIGN] * self.state.num_queues

    # -- platform -------------------------------------------------------------------

    def connect(self, mem: GuestMemory, set_irq: Callable[[bool], None]) -> None:
        """Attach to a platform: guest RAM and the interrupt line (called with True
        for every interrupt event, False when the line drops)."""
        self.state.mem = mem
        self._set_irq = set_irq

    def close(self) -> None:
        """Reset and detach the device."""
        self.state.close()

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus, without side effects."""
        return self._int_status

    def _raise(self, bit: int) -> None:
        # "The device MUST present each event by setting the corresponding bit in
        # InterruptStatus from the moment it takes place, until the driver
        # acknowledges the interrupt"
        self._int_status |= bit
        self._set_irq(True)

    def _on_used(self, index: int) -> None:
        self._raise(MmioInterrupt.VRING)

    def _on_config(self) -> None:
        self._raise(MmioInterrupt.CONFIG)

    # -- register access ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A driver read of ``size`` bytes at ``offset`` in the window."""
        if offset >= VIRTIO_MMIO_CONFIG:
            if size not in (1, 2, 4, 8):
                return 0
            return int.from_bytes(
                self.state.read_config(offset - VIRTIO_MMIO_CONFIG, size), "little"
            )
        reg = self._regs.get(offset)
        if reg is None or size != VIRTIO_MMIO_REG_WIDTH or "R" not in reg.access:
            what = "not a register" if reg is None else f"{reg.name} ({reg.access})"
            self.state.violation(f"read of {size} bytes at {offset:#x}: {what}", _ST_LAYOUT)
            return 0
        return self._get(MmioReg(offset))

    def write(self, offset: int, size: int, value: int) -> None:
        """A driver write of ``size`` bytes at ``offset`` in the window."""
        if offset >= VIRTIO_MMIO_CONFIG:
            if size in (1, 2, 4, 8):
                value &= (1 << 8 * size) - 1
                self.state.write_config(offset - VIRTIO_MMIO_CONFIG, value.to_bytes(size, "little"))
            return
        reg = self._regs.get(offset)
        if reg is None or size != VIRTIO_MMIO_REG_WIDTH or "W" not in reg.access:
            what = "not a register" if reg is None else f"{reg.name} ({reg.access})"
            self.state.violation(f"write of {size} bytes at {offset:#x}: {what}", _ST_LAYOUT)
            return
        self._set(MmioReg(offset), value & 0xFFFFFFFF)

    def _get(self, reg: MmioReg) -> int:
        st = self.state
        sel = self._queue_sel
        exists = 0 <= sel < st.num_queues
        R = MmioReg
        if reg == R.MAGIC_VALUE:
            return VIRTIO_MMIO_MAGIC_VALUE
        if reg == R.VERSION:
            return self.version
        if reg == R.DEVICE_ID:
            return int(self.device.device_id)
        if reg == R.VENDOR_ID:
            return VIRTIO_MMIO_VENDOR_ID
        if reg == R.DEVICE_FEATURES:
            return st.read_device_features_word(self._dfsel)
        if reg == R.QUEUE_NUM_MAX:
            return st.queue_max_size(sel) if exists else 0
        if reg == R.QUEUE_READY:
            return int(st.queue_enabled(sel))
        if reg == R.QUEUE_PFN:
            if not st.queue_enabled(sel):
                return 0
            return st.queue_addresses(sel).desc // self._guest_page_size
        if reg == R.INTERRUPT_STATUS:
            return self._int_status
        if reg == R.STATUS:
            return st.read_status()
        if reg in (R.SHM_LEN_LOW, R.SHM_LEN_HIGH, R.SHM_BASE_LOW, R.SHM_BASE_HIGH):
            return VIRTIO_MMIO_SHM_ABSENT & 0xFFFFFFFF
        if reg == R.CONFIG_GENERATION:
            return st.config_generation & 0xFFFFFFFF
        return 0  # QueueReset: a queue reset has always completed

    def _set(self, reg: MmioReg, value: int) -> None:
        st = self.state
        sel = self._queue_sel
        R = MmioReg
        if reg == R.DEVICE_FEATURES_SEL:
            self._dfsel = value
        elif reg == R.DRIVER_FEATURES_SEL:
            self._gfsel = value
        elif reg == R.DRIVER_FEATURES:
            if self.legacy and self._gfsel != 0 and value == 0:
                return  # Linux writes the (empty) upper word to a legacy device too
            st.write_driver_features_word(self._gfsel, value)
        elif reg == R.GUEST_PAGE_SIZE:
            if _is_pow2(value):
                self._guest_page_size = value
            else:
                st.violation(f"GuestPageSize {value} is not a power of 2", _ST_LEGACY)
        elif reg == R.QUEUE_SEL:
            self._queue_sel = value
        elif reg == R.QUEUE_NUM:
            st.set_queue_size(sel, value)
        elif reg == R.QUEUE_ALIGN:
            if not 0 <= sel < st.num_queues:
                st.violation(f"QueueAlign of queue {sel}, which does not exist", _ST_LEGACY)
            elif not _is_pow2(value):
                st.violation(f"QueueAlign {value} is not a power of 2", _ST_LEGACY)
            else:
                self._queue_align[sel] = value
        elif reg == R.QUEUE_PFN:
            self._set_pfn(value)
        elif reg == R.QUEUE_READY:
            if value == 1:
                st.enable_queue(sel)
            elif value == 0:
                st.disable_queue(sel)
            else:
                st.violation(f"QueueReady written with {value}", _ST_LAYOUT)
        elif reg == R.QUEUE_NOTIFY:
            st.notify_writes.append(NotifyWrite(int(reg), VIRTIO_MMIO_REG_WIDTH, value))
            self._notify(value)
        elif reg == R.INTERRUPT_ACK:
            if value & ~VIRTIO_MMIO_INT_MASK:
                st.violation(
                    f"InterruptACK {value:#x}: the driver MUST NOT set any of the undefined bits",
                    _ST_LAYOUT,
                )
            self._int_status &= ~value
            if not self._int_status:
                self._set_irq(False)
        elif reg == R.STATUS:
            st.write_status(value)
            if value & 0xFF == 0:
                # "Upon reset, the device MUST clear all bits in InterruptStatus and
                # ready bits in the QueueReady register for all queues"
                had_irq = bool(self._int_status)
                self._reset_registers()
                if had_irq:
                    self._set_irq(False)
        elif reg in (R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH):
            self._set_area(0, reg == R.QUEUE_DESC_HIGH, value)
        elif reg in (R.QUEUE_DRIVER_LOW, R.QUEUE_DRIVER_HIGH):
            self._set_area(1, reg == R.QUEUE_DRIVER_HIGH, value)
        elif reg in (R.QUEUE_DEVICE_LOW, R.QUEUE_DEVICE_HIGH):
            self._set_area(2, reg == R.QUEUE_DEVICE_HIGH, value)
        elif reg == R.SHM_SEL:
            self._shm_sel = value
        elif reg == R.QUEUE_RESET:
            if value == 1:
                st.reset_queue(sel)
            elif value != 0:
                st.violation(f"QueueReset written with {value}", _ST_LAYOUT)

    def _set_area(self, which: int, high: bool, value: int) -> None:
        st = self.state
        sel = self._queue_sel
        old = st.queue_addresses(sel)
        parts = [old.desc, old.driver, old.device]
        cur = parts[which]
        parts[which] = (cur & 0xFFFFFFFF | value << 32) if high else (cur & ~0xFFFFFFFF | value)
        st.set_queue_addresses(sel, QueueAddresses(parts[0], parts[1], parts[2]))

    def _set_pfn(self, pfn: int) -> None:
        """Legacy QueuePFN: "the index number of a page starting with the queue
        Descriptor Table"; the layout follows §2.7.2 with QueueAlign; 0 stops using
        the queue."""
        st = self.state
        sel = self._queue_sel
        if not 0 <= sel < st.num_queues:
            st.violation(f"QueuePFN of queue {sel}, which does not exist", _ST_LEGACY)
            return
        if pfn == 0:
            st.disable_queue(sel)
            return
        if st.queue_enabled(sel):
            st.violation(f"QueuePFN of queue {sel} rewritten while in use", _ST_LEGACY)
            return
        size = st.queue_size(sel)
        base = pfn * self._guest_page_size
        st.set_queue_addresses(sel, legacy_vring_addresses(base, size, self._queue_align[sel]))
        st.enable_queue(sel)

    def _notify(self, value: int) -> None:
        """QueueNotify: "the value written is the queue index" (§4.2.3.3), or with
        VIRTIO_F_NOTIFICATION_DATA negotiated the ``vq_index`` in bits 0-15 with
        ``next_off`` (bits 16-30) and ``next_wrap`` (bit 31) for the queue."""
        st = self.state
        next_off: int | None = None
        next_wrap = 0
        index = value
        if st.notification_data:
            index = value & 0xFFFF
            next_off = value >> 16 & 0x7FFF
            next_wrap = value >> 31
        if not 0 <= index < st.num_queues:
            st.violation(f"notification for queue {index}, which does not exist", _ST_NOTIFY)
            return
        if not st.queue_enabled(index):
            # "The device MUST NOT access virtqueue contents when QueueReady is zero"
            st.violation(f"notification for queue {index}, which is not ready", _ST_NOTIFY)
            return
        st.notify(index, next_off, next_wrap)
