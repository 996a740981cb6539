"""Device side of virtio over PCI: the virtio-pci registers of a PCI function.

:class:`VirtioPciFunction` is what a driver finds on the bus: a generic PCI function
(:class:`~pyvirtio.transport.pci.function.PciFunction`: type 0 configuration space,
BARs, capability list, MSI-X, INTx) with the ids of virtio-v1.2 §4.1.2 "PCI Device
Discovery", the virtio structure capabilities of §4.1.4 and the registers behind its
BARs:

- modern (``mode="modern"`` and ``"transitional"``): BAR4 (64-bit memory) holds the
  common configuration (§4.1.4.3), the ISR status byte (§4.1.4.5), the
  device-specific configuration (§4.1.4.6) and the notification area (§4.1.4.4),
  one 4 KiB page each; the VIRTIO_PCI_CAP_PCI_CFG capability (§4.1.4.8) reaches the
  same registers through configuration space;
- legacy (``"transitional"`` and ``"legacy"``): the legacy header in I/O BAR0
  (§4.1.4.10), whose device configuration moves from offset 20 to 24 while MSI-X is
  enabled, with rings placed by page frame number (4096 alignment);
- BAR1 holds the MSI-X table and pending bit array (served by the generic function).

Every virtio semantic (status machine, feature negotiation, configuration generation,
queue registers, notifications) is delegated to one
:class:`~pyvirtio.core.device_state.DeviceState`; this module only encodes registers.
A transitional function switches that state between legacy and modern behaviour by
the interface the driver uses while the device is reset (status 0).

A register access never raises. A driver breaking a MUST is answered as the spec
says (a read-only register ignores the write, a mapping failure reads NO_VECTOR, a
read of a register that is not there reads 0) and logged in
``state.violations`` with the clause.

Decisions the spec leaves open:
- Queue Notify addresses: ``queue_notify_off`` = queue index,
  ``notify_off_multiplier`` = 4, the notification area 4-byte aligned, 4 bytes per
  queue (what §4.1.4.4.1 asks of a device offering VIRTIO_F_NOTIFICATION_DATA).
  Without VIRTIO_F_NOTIFICATION_DATA a notification is the 16-bit queue index; one
  whose value is not the queue's index is logged and still delivered to the queue
  addressed (spurious notifications are harmless).
- VIRTIO_F_NOTIFICATION_DATA is offered through the modern interface
  (``notification_data=True``; never through the legacy one, which has 32 feature
  bits). Negotiated, a notification is the 32-bit ``vq_index | next_off << 16 |
  next_wrap << 31`` (§4.1.5.2): ``vq_index`` selects the queue (a value that differs
  from the queue the address belongs to is logged; one naming no queue is dropped),
  ``next_off``/``next_wrap`` go to the queue, which checks them against the ring (an
  inconsistent statement is logged, the ring is still served). A 16-bit (or other
  width) notification while it is negotiated breaks "the driver notification MUST be
  a 32-bit notification": it is logged and delivered without data.
  VIRTIO_F_NOTIF_CONFIG_DATA is not offered. Every notification write is kept in
  ``state.notify_writes`` (bounded).
- VIRTIO_F_RING_RESET is offered (``ring_reset=True``).
- Feature and queue selectors and MSI-X vector mappings return to their reset values
  on a device reset (writing 0 to the device status).
- A queue reset keeps the queue's MSI-X vector (it is transport configuration, not
  virtqueue state; Linux re-writes it when it re-enables the queue anyway).
- MSI-X messages (Bus Master, masking and pending bits) and INTx (off while MSI-X
  is enabled or INTx is disabled) behave as the generic function says
  (:mod:`~pyvirtio.transport.pci.function`); INTx follows the ISR status byte.
- Legacy device configuration is presented in guest-native byte order, which is
  little-endian on x86 (the only platform the in-process bus and qtest model): the
  same bytes as the modern interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pyvirtio.core.device import VirtioDevice
from pyvirtio.errors import ConfigurationError
from pyvirtio.memory.guest_memory import GuestMemory
from pyvirtio.spec.features import Feature
from pyvirtio.transport.device_state import NotifyWrite, TransportDeviceState
from pyvirtio.transport.pci.function import DmaWrite, IrqLine, PciFunction, pow2_at_least
from pyvirtio.transport.pci.spec import (
    COMMON_CFG_REGISTERS,
    LEGACY_HEADER_SIZE,
    LEGACY_HEADER_SIZE_MSIX,
    LEGACY_IO_BAR,
    LEGACY_MSIX_REGISTERS,
    LEGACY_REGISTERS,
    MODERN_BAR,
    MODERN_BAR_SIZE,
    MODERN_COMMON_OFFSET,
    MODERN_DEVICE_OFFSET,
    MODERN_ISR_OFFSET,
    MODERN_NOTIFY_OFF_MULTIPLIER,
    MODERN_NOTIFY_OFFSET,
    MSIX_BAR,
    MSIX_MAX_VECTORS,
    PCI_CLASS_FOR_TYPE,
    PCI_CLASS_OTHER,
    PCI_INTERRUPT_PIN_INTA,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_BAR_MAX,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CFG_CAP,
    VIRTIO_PCI_CFG_CAP_DATA,
    VIRTIO_PCI_COMMON_CFG,
    VIRTIO_PCI_NOTIFY_CAP,
    VIRTIO_PCI_QUEUE_ADDR_SHIFT,
    VIRTIO_PCI_REVISION_MODERN,
    VIRTIO_PCI_REVISION_TRANSITIONAL,
    VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
    VIRTIO_PCI_VENDOR_ID,
    VIRTIO_PCI_VRING_ALIGN,
    CommonCfg,
    IsrBits,
    PciCapId,
    Register,
    VirtioPciCap,
    VirtioPciCapType,
    VirtioPciCfgCap,
    VirtioPciNotifyCap,
    legacy_config_offset,
    legacy_vring_addresses,
    modern_pci_device_id,
    transitional_pci_device_id,
)
from pyvirtio.virtqueue.common import QueueAddresses

__all__ = [
    "PciMode",
    "VirtioPciFunction",
]

#: How a transitional or legacy function is driven.
PciMode = Literal["modern", "transitional", "legacy"]

_ST_LAYOUT = 'virtio-v1.2 §4.1.3.1 "Driver Requirements: PCI Device Layout"'
_ST_CAPS = 'virtio-v1.2 §4.1.4.1 "Driver Requirements: Virtio Structure PCI Capabilities"'
_ST_COMMON = 'virtio-v1.2 §4.1.4.3.2 "Driver Requirements: Common configuration structure layout"'
_ST_COMMON_LAYOUT = 'virtio-v1.2 §4.1.4.3 "Common configuration structure layout"'
_ST_NOTIFY = 'virtio-v1.2 §4.1.5.2.1 "Driver Requirements: Available Buffer Notifications"'
_ST_ISR = 'virtio-v1.2 §4.1.4.5 "ISR status capability"'
_ST_PCI_CFG = 'virtio-v1.2 §4.1.4.8.2 "Driver Requirements: PCI configuration access capability"'
_ST_MSIX = 'virtio-v1.2 §4.1.5.1.2.2 "Driver Requirements: MSI-X Vector Configuration"'
_ST_LEGACY = 'virtio-v1.2 §4.1.4.10 "Legacy Interfaces: A Note on PCI Device Layout"'
_ST_LEGACY_VQ = 'virtio-v1.2 §4.1.5.1.3.1 "Legacy Interface: A Note on Virtqueue Configuration"'


@dataclass(frozen=True)
class _Region:
    """A virtio structure inside a BAR (what a capability points at)."""

    cfg_type: int
    bar: int
    offset: int
    length: int


class VirtioPciFunction(PciFunction):
    """A virtio device as a PCI function (virtio-v1.2 §4.1).

    ``mode``: ``"modern"`` (non-transitional: device id 0x1040 + type, revision 1,
    only the capabilities), ``"transitional"`` (transitional device id, revision 0,
    subsystem id = device type, legacy I/O BAR0 *and* the capabilities) or
    ``"legacy"`` (a legacy device: transitional ids, only BAR0, no virtio
    capabilities). ``msix_vectors``: MSI-X table size (default: one per queue plus
    one for configuration changes; 0: no MSI-X capability, INTx only).
    ``ring_reset`` offers VIRTIO_F_RING_RESET (``queue_reset``).
    ``notification_data`` offers VIRTIO_F_NOTIFICATION_DATA through the modern
    interface (``"modern"`` and ``"transitional"``; a legacy interface never offers it).

    Attach to a bus with :meth:`connect` (the in-process bus does it). The
    :attr:`state` holds every virtio register semantic; ``state.violations`` logs
    what the driver did wrong.
    """

    def __init__(
        self,
        device: VirtioDevice,
        *,
        mode: PciMode = "modern",
        msix_vectors: int | None = None,
        ring_reset: bool = True,
        notification_data: bool = True,
        mem: GuestMemory | None = None,
    ) -> None:
        if mode not in ("modern", "transitional", "legacy"):
            raise ConfigurationError(f"unknown virtio-pci mode {mode!r}")
        dtype = int(device.device_id)
        if mode == "modern":
            pci_id = modern_pci_device_id(dtype)
            revision = VIRTIO_PCI_REVISION_MODERN
            # "SHOULD have a PCI Subsystem Device ID of 0x40 or higher"
            subsystem = pci_id
        else:
            tid = transitional_pci_device_id(dtype)
            if tid is None:
                raise ConfigurationError(
                    f"device type {dtype} has no transitional PCI device id "
                    "(virtio-v1.2 §4.1.2.1): it can only be a modern function"
                )
            pci_id = tid
            revision = VIRTIO_PCI_REVISION_TRANSITIONAL
            # "Transitional devices MUST have the PCI Subsystem Device ID matching the
            # Virtio Device ID" (§4.1.2.3)
            subsystem = dtype
        super().__init__(
            VIRTIO_PCI_VENDOR_ID,
            pci_id,
            PCI_CLASS_FOR_TYPE.get(dtype, PCI_CLASS_OTHER),
            revision=revision,
            subsystem_vendor_id=VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
            subsystem_id=subsystem,
            interrupt_pin=PCI_INTERRUPT_PIN_INTA,
        )
        self.mode: PciMode = mode
        self.state = TransportDeviceState(device, mem, legacy=mode == "legacy")
        if ring_reset:
            self.state.transport_features |= Feature.RING_RESET.mask
        if notification_data and mode != "legacy":
            # only reaches the driver through the modern interface: the legacy one
            # offers 32 feature bits
            self.state.transport_features |= Feature.NOTIFICATION_DATA.mask
        self.state.on_used = self._on_used
        self.state.on_config = self._on_config
        self.device = device
        nq = device.num_queues
        # transport registers (reset on device reset)
        self._dfselect = 0
        self._gfselect = 0
        self._queue_select = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * nq
        self._isr = 0
        self._legacy_notify = 0
        config_size = self.state.config_size()
        if config_size > 0x1000:
            raise ConfigurationError("device configuration larger than 4 KiB")
        self._regions: list[_Region] = []
        self._has_modern = mode != "legacy"
        self._has_legacy = mode != "modern"
        # -- BARs
        if self._has_legacy:
            self._legacy_size = pow2_at_least(LEGACY_HEADER_SIZE_MSIX + config_size, 32)
            self.add_bar(LEGACY_IO_BAR, self._legacy_size, io=True)
        if msix_vectors is None:
            msix_vectors = nq + 1
        if not 0 <= msix_vectors <= MSIX_MAX_VECTORS:
            raise ConfigurationError(f"msix_vectors must be 0..{MSIX_MAX_VECTORS}")
        if self._has_modern:
            notify_len = max(nq, 1) * MODERN_NOTIFY_OFF_MULTIPLIER
            # one 4 KiB page per structure; the notification area grows with the
            # queue count ("cap.length ... MUST be large enough to support queue
            # notification offsets for all supported queues", §4.1.4.4.1)
            bar_size = pow2_at_least(MODERN_NOTIFY_OFFSET + notify_len, MODERN_BAR_SIZE)
            self.add_bar(MODERN_BAR, bar_size, mem64=True, prefetch=True)
            self._regions = [
                _Region(
                    VirtioPciCapType.COMMON_CFG,
                    MODERN_BAR,
                    MODERN_COMMON_OFFSET,
                    VIRTIO_PCI_COMMON_CFG.size,
                ),
                _Region(VirtioPciCapType.NOTIFY_CFG, MODERN_BAR, MODERN_NOTIFY_OFFSET, notify_len),
                _Region(VirtioPciCapType.ISR_CFG, MODERN_BAR, MODERN_ISR_OFFSET, 1),
            ]
            if config_size:
                # "The device MUST present at least one VIRTIO_PCI_CAP_DEVICE_CFG
                # capability for any device type which has a device-specific
                # configuration" (§4.1.4.6)
                self._regions.append(
                    _Region(
                        VirtioPciCapType.DEVICE_CFG, MODERN_BAR, MODERN_DEVICE_OFFSET, config_size
                    )
                )
            self._build_virtio_caps()
        if msix_vectors:
            # the table and PBA in BAR1; the capability follows the virtio ones
            self.add_msix(msix_vectors, MSIX_BAR)

    # -- capabilities -------------------------------------------------------------------

    def _build_virtio_caps(self) -> None:
        for r in self._regions:
            if r.cfg_type == VirtioPciCapType.NOTIFY_CFG:
                raw = VIRTIO_PCI_NOTIFY_CAP.pack(
                    VirtioPciNotifyCap(
                        PciCapId.VNDR,
                        0,
                        VIRTIO_PCI_NOTIFY_CAP.size,
                        r.cfg_type,
                        r.bar,
                        0,
                        r.offset,
                        r.length,
                        MODERN_NOTIFY_OFF_MULTIPLIER,
                    )
                )
            else:
                raw = VIRTIO_PCI_CAP.pack(
                    VirtioPciCap(
                        PciCapId.VNDR,
                        0,
                        VIRTIO_PCI_CAP.size,
                        r.cfg_type,
                        r.bar,
                        0,
                        r.offset,
                        r.length,
                    )
                )
            self.add_capability(PciCapId.VNDR, raw[2:])
        raw = VIRTIO_PCI_CFG_CAP.pack(
            VirtioPciCfgCap(
                PciCapId.VNDR,
                0,
                VIRTIO_PCI_CFG_CAP.size,
                VirtioPciCapType.PCI_CFG,
                0,
                0,
                0,
                0,
                0,
            )
        )
        off = self.add_capability(PciCapId.VNDR, raw[2:])
        self._pci_cfg_cap = off
        # cap.bar, cap.offset, cap.length and pci_cfg_data are read-write (§4.1.4.8)
        self._set_wmask(off + VIRTIO_PCI_CAP_BAR, 1, 0xFF)
        self._set_wmask(off + VIRTIO_PCI_CAP_OFFSET, 4, 0xFFFFFFFF)
        self._set_wmask(off + VIRTIO_PCI_CAP_LENGTH, 4, 0xFFFFFFFF)
        self._set_wmask(off + VIRTIO_PCI_CFG_CAP_DATA, 4, 0xFFFFFFFF)

    @property
    def pci_cfg_cap_offset(self) -> int | None:
        """Offset of the VIRTIO_PCI_CAP_PCI_CFG capability (None for legacy)."""
        return getattr(self, "_pci_cfg_cap", None)

    # -- platform ---------------------------------------------------------------------------

    def connect(self, mem: GuestMemory, dma_write: DmaWrite, set_irq: IrqLine) -> None:
        """Attach to a platform: the guest RAM the rings live in, the path for MSI-X
        messages (device-initiated memory writes) and the INTx line."""
        self.state.mem = mem
        super().connect(mem, dma_write, set_irq)

    def close(self) -> None:
        """Reset and detach the device."""
        self.state.close()

    # -- configuration space hooks -------------------------------------------------------

    def _before_cfg_read(self, offset: int, size: int) -> None:
        cap = self.pci_cfg_cap_offset
        if cap is not None:
            data = cap + VIRTIO_PCI_CFG_CAP_DATA
            if offset < data + 4 and data < offset + size:
                self._pci_cfg_access(write=False)

    def _after_cfg_write(self, offset: int, size: int, old: bytes) -> None:
        # (INTx and MSI-X follow command and Message Control writes in PciFunction)
        cap = self.pci_cfg_cap_offset
        if cap is not None:
            data = cap + VIRTIO_PCI_CFG_CAP_DATA
            if offset < data + 4 and data < offset + size:
                self._pci_cfg_access(write=True)

    def _pci_cfg_access(self, *, write: bool) -> None:
        """virtio-v1.2 §4.1.4.8: run the access ``pci_cfg_data`` stands for.

        "Upon detecting driver write access to pci_cfg_data, the device MUST execute
        a write access at offset cap.offset at BAR selected by cap.bar using the
        first cap.length bytes from pci_cfg_data" (and reads likewise). The driver
        "MUST NOT write a cap.offset which is not a multiple of cap.length" and must
        address bytes inside another virtio structure: otherwise nothing is
        accessed (reads leave ``pci_cfg_data`` as it was).
        """
        cap = self.pci_cfg_cap_offset
        assert cap is not None  # only called when the capability exists
        bar = self.config[cap + VIRTIO_PCI_CAP_BAR]
        off = self._get(cap + VIRTIO_PCI_CAP_OFFSET, 4)
        length = self._get(cap + VIRTIO_PCI_CAP_LENGTH, 4)
        data_at = cap + VIRTIO_PCI_CFG_CAP_DATA
        if length not in (1, 2, 4) or off % length:
            self.state.violation(
                f"pci_cfg access with length {length} at offset {off:#x}", _ST_PCI_CFG
            )
            return
        if bar > VIRTIO_PCI_CAP_BAR_MAX or not any(
            r.bar == bar and r.offset <= off and off + length <= r.offset + r.length
            for r in self._regions
        ):
            self.state.violation(
                f"pci_cfg access to BAR {bar} offset {off:#x} outside every virtio structure",
                _ST_PCI_CFG,
            )
            return
        if write:
            self.bar_write(bar, off, length, self._get(data_at, length))
        else:
            self._set(data_at, length, self.bar_read(bar, off, length))

    # -- interrupts ---------------------------------------------------------------------------

    @property
    def isr(self) -> int:
        """The ISR status byte (without reading, hence without clearing it)."""
        return self._isr

    def _intx_condition(self) -> bool:
        """INTx follows ISR status ("If MSI-X capability is disabled, the device MUST
        set the Interrupt Status bit in the PCI Status register ... to the logical OR
        of all bits in ISR status", §4.1.4.5); PciFunction keeps it off while MSI-X is
        enabled or INTx is disabled."""
        return bool(self._isr)

    def _raise_intx(self, bits: int) -> None:
        self._isr |= bits
        self._intx_event()

    def _on_used(self, index: int) -> None:
        """Used buffer notification (virtio-v1.2 §4.1.5.3): the queue's MSI-X vector
        if MSI-X is enabled (none for NO_VECTOR: "the device MUST NOT deliver an
        interrupt for that virtqueue"), else ISR bit 0 and INTx."""
        if self.msix_enabled:
            vec = self._queue_vectors[index] if 0 <= index < len(self._queue_vectors) else -1
            if 0 <= vec != VIRTIO_MSI_NO_VECTOR:
                self._msix_notify(vec)
            return
        self._raise_intx(IsrBits.QUEUE)

    def _on_config(self) -> None:
        """Configuration change notification (virtio-v1.2 §4.1.5.4): "The device MUST
        set the Device Configuration Interrupt bit in ISR status before sending a
        device configuration change notification", then MSI-X or INTx."""
        if self.msix_enabled:
            self._isr |= IsrBits.CONFIG
            if self._config_vector != VIRTIO_MSI_NO_VECTOR:
                self._msix_notify(self._config_vector)
            return
        self._raise_intx(IsrBits.CONFIG)

    def _read_isr(self) -> int:
        """ "The device MUST reset ISR status to 0 on driver read" (and de-assert)."""
        value = self._isr
        self._isr = 0
        self._update_intx()
        return value

    # -- BAR dispatch --------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """Read a register behind BAR ``index``."""
        if size not in (1, 2, 4, 8) or offset < 0:
            return 0
        if index == MODERN_BAR and self._has_modern:
            return self._modern_read(offset, size)
        if index == LEGACY_IO_BAR and self._has_legacy:
            return self._legacy_read(offset, size)
        return super().bar_read(index, offset, size)  # MSI-X BAR, or unbacked

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """Write a register behind BAR ``index``."""
        if size not in (1, 2, 4, 8) or offset < 0:
            return
        value &= (1 << 8 * size) - 1
        if index == MODERN_BAR and self._has_modern:
            self._modern_write(offset, size, value)
        elif index == LEGACY_IO_BAR and self._has_legacy:
            self._legacy_write(offset, size, value)
        else:
            super().bar_write(index, offset, size, value)  # MSI-X BAR, or unbacked

    def _modern_read(self, offset: int, size: int) -> int:
        if offset >= MODERN_NOTIFY_OFFSET:
            return 0  # notification area reads as 0
        if offset >= MODERN_DEVICE_OFFSET:
            if self.state.config_size() == 0:
                return 0
            return int.from_bytes(
                self.state.read_config(offset - MODERN_DEVICE_OFFSET, size), "little"
            )
        if offset >= MODERN_ISR_OFFSET:
            return self._read_isr() if offset == MODERN_ISR_OFFSET else 0
        return self._common_read(offset - MODERN_COMMON_OFFSET, size)

    def _modern_write(self, offset: int, size: int, value: int) -> None:
        if offset >= MODERN_NOTIFY_OFFSET:
            self._notify_write(offset - MODERN_NOTIFY_OFFSET, size, value)
        elif offset >= MODERN_DEVICE_OFFSET:
            self.state.write_config(offset - MODERN_DEVICE_OFFSET, value.to_bytes(size, "little"))
        elif offset >= MODERN_ISR_OFFSET:
            self.state.violation("ISR status written (it is read-to-clear)", _ST_ISR)
        else:
            self._common_write(offset - MODERN_COMMON_OFFSET, size, value)

    # -- notifications (virtio-v1.2 §4.1.4.4, §4.1.5.2) -----------------------------------

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        st = self.state
        st.notify_writes.append(NotifyWrite(offset, size, value))
        index, rem = divmod(offset, MODERN_NOTIFY_OFF_MULTIPLIER)
        if rem or not 0 <= index < st.num_queues:
            st.violation(
                f"notification written at {offset:#x}, not a Queue Notify address", _ST_NOTIFY
            )
            return
        if st.notification_data:
            self._notify_data_write(index, size, value)
            return
        if size != 2:
            st.violation(
                f"{size}-byte notification: without VIRTIO_F_NOTIFICATION_DATA "
                "the driver notification MUST be a 16-bit notification",
                _ST_NOTIFY,
            )
        if value & 0xFFFF != index:
            st.violation(
                f"notification value {value:#x} at queue {index}'s address: the driver "
                "MUST set the notification value to the virtqueue index",
                _ST_NOTIFY,
            )
        self._notify(index)

    def _notify_data_write(self, index: int, size: int, value: int) -> None:
        """A notification with VIRTIO_F_NOTIFICATION_DATA negotiated: "the driver
        notification MUST be a 32-bit notification" whose ``vq_index`` is "the
        virtqueue index" (§4.1.5.2.1). ``vq_index`` selects the queue; a notification
        of another width is logged and delivered without data."""
        st = self.state
        vqn = value & 0xFFFF
        if size != 4:
            st.violation(
                f"{size}-byte notification: with VIRTIO_F_NOTIFICATION_DATA the driver "
                "notification MUST be a 32-bit notification",
                _ST_NOTIFY,
            )
        if vqn != index:
            st.violation(
                f"notification vq_index {vqn} at queue {index}'s address: the driver MUST "
                "set vq_index to the virtqueue index",
                _ST_NOTIFY,
            )
            if not 0 <= vqn < st.num_queues:
                return
        if size != 4:
            self._notify(vqn)
        else:
            self._notify(vqn, value >> 16 & 0x7FFF, value >> 31)

    def _notify(self, index: int, next_off: int | None = None, next_wrap: int = 0) -> None:
        st = self.state
        if 0 <= index < st.num_queues and not st.queue_enabled(index):
            st.violation(
                f"notification for queue {index}, which is not enabled "
                "(the device does not execute requests from a disabled queue)",
                _ST_COMMON_LAYOUT,
            )
            return
        st.notify(index, next_off, next_wrap)

    # -- interface selection (transitional) -------------------------------------------------

    def _use_interface(self, legacy: bool, *, resetting: bool = False) -> None:
        """A transitional device serves whichever interface the driver resets it
        through: the first access to one interface's registers while the device is
        reset (status 0) selects it, and so does a reset (device status written 0)
        through that interface while the device is live through the other one.

        The second case is a driver taking the device over from firmware: SeaBIOS
        drives a virtio-blk disk through the modern interface and leaves it live;
        Linux with ``virtio_pci.force_legacy=1`` then starts by writing 0 to the
        legacy status register (found by Linux 7.3 under QEMU 11.1 vfio-user-pci)."""
        st = self.state
        if self.mode != "transitional" or st.legacy == legacy:
            return
        if st.status != 0 and resetting:
            self._write_status(0)
        if st.status != 0:
            st.violation(
                f"{'legacy' if legacy else 'modern'} interface used while the device is "
                f"live through the {'modern' if legacy else 'legacy'} one",
                _ST_LEGACY,
            )
            return
        st.legacy = legacy
        st.reset()

    def _device_reset(self) -> None:
        """Transport registers after a device reset: "The device MUST have all queue
        and configuration change events ... unmapped upon reset" (§4.1.5.1.2.1)."""
        self._dfselect = 0
        self._gfselect = 0
        self._queue_select = 0
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.state.num_queues
        self._isr = 0
        self._legacy_notify = 0
        self._update_intx()

    def _function_reset(self) -> None:
        """A function-level reset resets the virtio device too (status 0)."""
        self._write_status(0)

    def _write_status(self, value: int) -> None:
        self.state.write_status(value)
        if value & 0xFF == 0:
            self._device_reset()

    def _map_vector(self, vector: int) -> int:
        """A driver's vector mapping; NO_VECTOR reports a failure ("Devices MUST report
        mapping failures by returning the NO_VECTOR value")."""
        if vector == VIRTIO_MSI_NO_VECTOR:
            return vector
        if not vector < self.msix_table_size:
            self.state.violation(
                f"MSI-X vector {vector} outside the table of {self.msix_table_size}: the driver "
                "MUST NOT attempt to map an event to a vector outside the MSI-X Table",
                _ST_MSIX,
            )
            return VIRTIO_MSI_NO_VECTOR
        return vector

    # -- common configuration (virtio-v1.2 §4.1.4.3) ------------------------------------

    def _common_read(self, offset: int, size: int) -> int:
        reg = _COMMON_BY_OFFSET.get(offset)
        if reg is not None and size == 8 and reg.width == 4 and offset in _COMMON_64:
            return self._common_get(reg.name) | self._common_get(_COMMON_64[offset]) << 32
        if reg is None or reg.width != size:
            self.state.violation(
                f"common configuration read of {size} bytes at {offset:#x} is not a register "
                "access of the field's width",
                _ST_LAYOUT,
            )
            return 0
        self._use_interface(legacy=False)
        return self._common_get(reg.name)

    def _common_get(self, name: str) -> int:
        st = self.state
        sel = self._queue_select
        exists = 0 <= sel < st.num_queues
        if name == "device_feature_select":
            return self._dfselect
        if name == "device_feature":
            return st.read_device_features_word(self._dfselect)
        if name == "driver_feature_select":
            return self._gfselect
        if name == "driver_feature":
            return st.read_driver_features_word(self._gfselect)
        if name == "config_msix_vector":
            return self._config_vector
        if name == "num_queues":
            return st.num_queues
        if name == "device_status":
            return st.read_status()
        if name == "config_generation":
            return st.config_generation & 0xFF
        if name == "queue_select":
            return sel
        if name == "queue_size":
            # "The device MUST present a 0 in queue_size if the virtqueue corresponding
            # to the current queue_select is unavailable."
            return st.queue_size(sel) if exists else 0
        if name == "queue_msix_vector":
            return self._queue_vectors[sel] if exists else VIRTIO_MSI_NO_VECTOR
        if name == "queue_enable":
            return int(st.queue_enabled(sel))
        if name == "queue_notify_off":
            return sel if exists else 0
        if name.startswith(("queue_desc", "queue_driver", "queue_device")):
            addrs = st.queue_addresses(sel)
            area, half = name.rsplit("_", 1)
            value = {"queue_desc": addrs.desc, "queue_driver": addrs.driver}.get(area, addrs.device)
            return value >> 32 if half == "hi" else value & 0xFFFFFFFF
        # queue_notify_data (VIRTIO_F_NOTIF_CONFIG_DATA not offered), queue_reset
        # (a reset completes at once: "MUST present 0 ... when queue reset has
        # completed"), admin_queue_index / admin_queue_num (no admin queues)
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        reg = _COMMON_BY_OFFSET.get(offset)
        if reg is not None and size == 8 and reg.width == 4 and offset in _COMMON_64:
            self._common_write(offset, 4, value & 0xFFFFFFFF)
            self._common_write(offset + 4, 4, value >> 32)
            return
        if reg is None or reg.width != size:
            self.state.violation(
                f"common configuration write of {size} bytes at {offset:#x} is not a "
                "register access of the field's width",
                _ST_LAYOUT,
            )
            return
        self._use_interface(
            legacy=False, resetting=reg.name == "device_status" and value & 0xFF == 0
        )
        if reg.access == "R":
            # "The driver MUST NOT write to device_feature, num_queues,
            # config_generation, queue_notify_off or queue_notify_data."
            self.state.violation(f"{reg.name} is read-only for the driver", _ST_COMMON)
            return
        self._common_set(reg.name, value)

    def _common_set(self, name: str, value: int) -> None:
        st = self.state
        sel = self._queue_select
        exists = 0 <= sel < st.num_queues
        if name == "device_feature_select":
            self._dfselect = value
        elif name == "driver_feature_select":
            self._gfselect = value
        elif name == "driver_feature":
            st.write_driver_features_word(self._gfselect, value)
        elif name == "config_msix_vector":
            self._config_vector = self._map_vector(value)
        elif name == "device_status":
            self._write_status(value)
        elif name == "queue_select":
            self._queue_select = value
        elif name == "queue_size":
            st.set_queue_size(sel, value)
        elif name == "queue_msix_vector":
            if exists:
                self._queue_vectors[sel] = self._map_vector(value)
            else:
                st.violation(f"queue_msix_vector of queue {sel}, which does not exist", _ST_COMMON)
        elif name == "queue_enable":
            if value == 1:
                st.enable_queue(sel)
            else:
                st.violation(
                    f"queue_enable written with {value}: the driver MUST NOT write a 0 to "
                    "queue_enable",
                    _ST_COMMON,
                )
        elif name == "queue_reset":
            if value == 1:
                st.reset_queue(sel)
            elif value != 0:
                st.violation(f"queue_reset written with {value}", _ST_COMMON)
        else:  # queue_desc / queue_driver / queue_device halves
            area, half = name.rsplit("_", 1)
            old = st.queue_addresses(sel)
            cur = {"queue_desc": old.desc, "queue_driver": old.driver}.get(area, old.device)
            new = cur & 0xFFFFFFFF | value << 32 if half == "hi" else cur & ~0xFFFFFFFF | value
            if area == "queue_desc":
                addrs = QueueAddresses(new, old.driver, old.device)
            elif area == "queue_driver":
                addrs = QueueAddresses(old.desc, new, old.device)
            else:
                addrs = QueueAddresses(old.desc, old.driver, new)
            st.set_queue_addresses(sel, addrs)

    # -- legacy I/O BAR0 (virtio-v1.2 §4.1.4.10) -------------------------------------------

    @property
    def legacy_config_offset(self) -> int:
        """Where device configuration starts in BAR0 now (20, or 24 with MSI-X on)."""
        return legacy_config_offset(self.msix_enabled)

    def _legacy_reg(self, offset: int, size: int) -> Register | Literal[False] | None:
        """The legacy header register at ``offset`` (None: device configuration;
        False: a bad access inside the header)."""
        cfg = self.legacy_config_offset
        if offset >= cfg:
            return None
        reg = _LEGACY_BY_OFFSET.get(offset)
        if reg is None or reg.width != size:
            return False
        if reg.offset >= LEGACY_HEADER_SIZE and not self.msix_enabled:
            return False
        return reg

    def _legacy_read(self, offset: int, size: int) -> int:
        self._use_interface(legacy=True)
        reg = self._legacy_reg(offset, size)
        if reg is None:
            # "the driver MAY access the device-specific configuration region using any
            # width accesses" - in guest-native (x86: little) byte order
            data = self.state.read_config(offset - self.legacy_config_offset, size)
            return int.from_bytes(data, "little")
        if reg is False:
            self.state.violation(
                f"legacy header read of {size} bytes at {offset} is not a register", _ST_LEGACY
            )
            return 0
        st = self.state
        sel = self._queue_select
        exists = 0 <= sel < st.num_queues
        name = reg.name
        if name == "host_features":
            return st.read_device_features_word(0)
        if name == "guest_features":
            return st.read_driver_features_word(0)
        if name == "queue_pfn":
            if not st.queue_enabled(sel):
                return 0
            return st.queue_addresses(sel).desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if name == "queue_num":
            return st.queue_max_size(sel) if exists else 0
        if name == "queue_sel":
            return sel
        if name == "queue_notify":
            return self._legacy_notify
        if name == "status":
            return st.read_status()
        if name == "isr":
            return self._read_isr()
        if name == "config_msix_vector":
            return self._config_vector
        # queue_msix_vector
        return self._queue_vectors[sel] if exists else VIRTIO_MSI_NO_VECTOR

    def _legacy_write(self, offset: int, size: int, value: int) -> None:
        reg = self._legacy_reg(offset, size)
        resetting = isinstance(reg, Register) and reg.name == "status" and value & 0xFF == 0
        self._use_interface(legacy=True, resetting=resetting)
        st = self.state
        if reg is None:
            st.write_config(offset - self.legacy_config_offset, value.to_bytes(size, "little"))
            return
        if reg is False:
            st.violation(
                f"legacy header write of {size} bytes at {offset} is not a register", _ST_LEGACY
            )
            return
        if reg.access == "R":
            st.violation(f"legacy {reg.name} is read-only", _ST_LEGACY)
            return
        sel = self._queue_select
        name = reg.name
        if name == "guest_features":
            st.write_driver_features_word(0, value)
        elif name == "queue_pfn":
            self._legacy_set_pfn(value)
        elif name == "queue_sel":
            self._queue_select = value
        elif name == "queue_notify":
            self._legacy_notify = value
            if 0 <= value < st.num_queues:
                self._notify(value)
            else:
                st.violation(f"legacy notification for queue {value}", _ST_LEGACY)
        elif name == "status":
            self._write_status(value)
        elif name == "config_msix_vector":
            self._config_vector = self._map_vector(value)
        elif 0 <= sel < st.num_queues:  # queue_msix_vector
            self._queue_vectors[sel] = self._map_vector(value)
        else:
            st.violation(f"queue_msix_vector of queue {sel}, which does not exist", _ST_LEGACY)

    def _legacy_set_pfn(self, pfn: int) -> None:
        """Legacy Queue Address: the ring at ``pfn * 4096`` with the fixed maximum
        size ("There was no mechanism to negotiate the queue size") laid out with
        4096 alignment (§4.1.5.1.3.1); 0 stops using the queue."""
        st = self.state
        sel = self._queue_select
        if not 0 <= sel < st.num_queues:
            st.violation(f"legacy Queue Address of queue {sel}, which does not exist", _ST_LEGACY)
            return
        if pfn == 0:
            st.disable_queue(sel)
            return
        if st.queue_enabled(sel):
            st.violation(
                f"legacy Queue Address of queue {sel} rewritten while in use", _ST_LEGACY_VQ
            )
            return
        size = st.queue_max_size(sel)
        base = pfn << VIRTIO_PCI_QUEUE_ADDR_SHIFT
        st.set_queue_size(sel, size)
        st.set_queue_addresses(sel, legacy_vring_addresses(base, size, VIRTIO_PCI_VRING_ALIGN))
        st.enable_queue(sel)


#: common configuration registers by offset (64-bit fields as two 32-bit halves)
_COMMON_BY_OFFSET: dict[int, Register] = {r.offset: r for r in COMMON_CFG_REGISTERS}
#: low half offset -> high half name of the three 64-bit fields
_COMMON_64: dict[int, str] = {
    CommonCfg.QUEUE_DESC: "queue_desc_hi",
    CommonCfg.QUEUE_DRIVER: "queue_driver_hi",
    CommonCfg.QUEUE_DEVICE: "queue_device_hi",
}


#: legacy header registers by offset (the MSI-X pair only counts while MSI-X is on)
_LEGACY_BY_OFFSET: dict[int, Register] = {
    r.offset: r for r in (*LEGACY_REGISTERS, *LEGACY_MSIX_REGISTERS)
}
