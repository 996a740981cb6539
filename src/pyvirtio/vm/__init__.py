"""Guest kit: boot a Linux guest under QEMU to check pyvirtio against real drivers.

- :mod:`pyvirtio.vm.kernel`: Debian's guest kernel, downloaded (``apt-get download``)
  and unpacked (``dpkg -x``) into a cache, never installed; module dependencies.
- :mod:`pyvirtio.vm.initramfs`: a busybox initramfs written in pure Python, loading
  the virtio modules and running a caller's shell snippet between two markers.
- :mod:`pyvirtio.vm.qemu`: :class:`GuestVM`, the QEMU (TCG) command line and runner
  with serial console capture, timeout and clean shutdown.
- :mod:`pyvirtio.vm.peers`: the two generations of peers: the system's QEMU with
  Debian 12's kernel (the default), and QEMU 11.1 + Linux 7.3 from trixie-backports,
  run from a private trixie root that ``scripts/install-trixie-peers.sh`` sets up.

Typical use::

    kernel = fetch_kernel()
    initrd = build_initramfs(tmp / "initrd.gz", kernel, "md5sum /dev/vda",
                             modules=["virtio_blk"])
    vm = GuestVM(kernel.vmlinuz, initrd.path)
    vm.drive(f"if=none,id=d0,file={img},format=raw").device("virtio-blk-pci,drive=d0")
    result = vm.run(timeout=120).check()

The second generation: ``gen = peer_generation(TRIXIE_GENERATION)``, then build the
initramfs from ``gen.kernel`` and pass ``peer=gen.qemu`` to :class:`GuestVM`.
"""

from __future__ import annotations

from pyvirtio.vm.initramfs import (
    DONE_MARKER,
    INSMOD_FAILED_MARKER,
    READY_MARKER,
    TRANSPORT_MODULES,
    CpioWriter,
    Initramfs,
    build_initramfs,
)
from pyvirtio.vm.kernel import GuestKernel, KernelModule, ModuleIndex, cache_root, fetch_kernel
from pyvirtio.vm.peers import (
    GENERATIONS,
    SYSTEM_GENERATION,
    TRIXIE_GENERATION,
    PeerGeneration,
    QemuPeer,
    peer_generation,
    system_qemu,
    trixie_kernel,
    trixie_qemu,
)
from pyvirtio.vm.qemu import (
    GuestResult,
    GuestRunError,
    GuestVM,
    RunningGuest,
    marker_lines,
    marker_values,
)

__all__ = [
    "DONE_MARKER",
    "GENERATIONS",
    "INSMOD_FAILED_MARKER",
    "READY_MARKER",
    "SYSTEM_GENERATION",
    "TRANSPORT_MODULES",
    "TRIXIE_GENERATION",
    "CpioWriter",
    "GuestKernel",
    "GuestResult",
    "GuestRunError",
    "GuestVM",
    "Initramfs",
    "KernelModule",
    "ModuleIndex",
    "PeerGeneration",
    "QemuPeer",
    "RunningGuest",
    "build_initramfs",
    "cache_root",
    "fetch_kernel",
    "marker_lines",
    "marker_values",
    "peer_generation",
    "system_qemu",
    "trixie_kernel",
    "trixie_qemu",
]
