"""``pyvirtio serve balloon`` against Linux 7.3's virtio_balloon driver under QEMU 11.1.

Peer: the Linux 7.3 ``virtio_balloon`` module (trixie-backports kernel; a module, not
built in) in a guest under QEMU 11.1 (trixie-backports, the private trixie root),
attached through QEMU's generic vhost-user front-end
``vhost-user-test-device-pci,virtio-id=5,num_vqs=5,config_size=16``. QEMU has no
vhost-user balloon front-end of its own; the generic one exists from QEMU 9.1 on, so
only the ``qemu11.1-linux7.3`` generation has it (the system QEMU 7.2 does not): the
test runs on that generation only, a property of the peer.

The back-end runs with a control socket (``--control``). Once the guest has loaded the
driver the test sets a target of 64 MiB on it; the guest inflates (its MemTotal drops:
without VIRTIO_BALLOON_F_DEFLATE_ON_OOM Linux takes ballooned pages out of its managed
count), writes ``actual``, and reports statistics every second (``--stats-interval``);
a free page hinting round is opened (the guest hints its free pages under the new
command id); then the target goes back to 0 and the guest deflates. The back-end's ``actual``,
inflated page count, statistics and the bytes it gave back (holes punched in QEMU's
guest-RAM memfd) are read over the control socket.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.devices.balloon import balloon_command
from pyvirtio.vm import TRIXIE_GENERATION, GuestVM, build_initramfs
from tests.interop.test_vhost_user_guest import serve
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PEER = (
    "Linux 7.3 virtio_balloon (trixie-backports kernel) under QEMU 11.1's "
    "vhost-user-test-device-pci (private trixie root)"
)
TARGET = 16384  # pages: 64 MiB
MEM_MIB = 256
# Linux's balloon without DEFLATE_ON_OOM (so MemTotal shows the balloon); PAGE_POISON is
# dropped by a guest without page poisoning; five queues with all the optional ones
FEATURES = "MUST_TELL_HOST,STATS_VQ,FREE_PAGE_HINT,PAGE_POISON,REPORTING"

GUEST_SCRIPT = r"""
memtotal() { awk '/^MemTotal:/ {print $2}' /proc/meminfo; }
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = "0x0005" ] || continue
  echo "GUEST-BALLOON $(basename $d) features=$(cat $d/features)"
done
m0=$(memtotal)
echo "GUEST-MEM0 $m0"
low=$m0
i=0
while [ $i -lt 600 ]; do
  sleep 0.5
  m=$(memtotal)
  echo "GUEST-MEM $m"
  [ $m -lt $low ] && low=$m
  # inflated by 60 MiB or more and back: done
  if [ $((m0 - low)) -ge 61440 ] && [ $m -ge $((m0 - 1024)) ]; then
    echo "GUEST-LOW $low"
    echo "GUEST-DONE"
    exit 0
  fi
  i=$((i + 1))
done
exit 1
"""


def _wait_info(ctl: Path, cond: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = balloon_command(str(ctl), "info")
        if cond(info):
            return info
        time.sleep(0.25)
    raise AssertionError(f"{what}: never happened; last info {info}")


def test_linux_balloon_inflates_deflates_and_reports_stats(tmp_path: Path) -> None:
    """A target set over the control socket is followed by the Linux guest (MemTotal
    drops by it, ``actual`` reaches it), stats arrive, and back to 0."""
    peers = resolve_peers(TRIXIE_GENERATION)
    ird = build_initramfs(
        tmp_path / "initramfs.gz", peers.kernel, GUEST_SCRIPT, modules=["virtio_balloon"]
    )
    ctl = tmp_path / "balloon.ctl"
    args = ["balloon", "--features", FEATURES, "--stats-interval", "1", "--control", str(ctl)]
    with serve(args, tmp_path, "balloon") as be:
        vm = GuestVM(
            peers.kernel.boot_image,
            ird.path,
            memory_mib=MEM_MIB,
            shared_memory=True,
            peer=peers.qemu,
        )
        vm.chardev(f"socket,id=c0,path={be.socket_path}")
        vm.device("vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=5,config_size=16")
        with vm.start(tmp_path / "console.log") as guest:
            m = guest.wait_for(r"GUEST-MEM0 (\d+)", 240)
            assert m is not None, guest.diagnostics()
            mem0 = int(m.group(1))
            feats = guest.wait_for(r"GUEST-BALLOON \S+ features=(\d+)", 1)
            assert feats is not None, guest.diagnostics()
            # the statistics the driver sent with its first buffer (at probe)
            info = _wait_info(ctl, lambda i: i["stats_reports"] >= 1, 60, "first stats")
            ram_before = info["ram_allocated_bytes"]
            balloon_command(str(ctl), f"target {TARGET}")
            info = _wait_info(
                ctl, lambda i: i["actual"] == TARGET, 180, f"actual {TARGET} (inflate)"
            )
            assert info["inflated_pages"] == TARGET
            assert info["discarded_bytes"] >= TARGET * 4096
            ram_inflated = info["ram_allocated_bytes"]
            reports = info["stats_reports"]
            info = _wait_info(ctl, lambda i: i["stats_reports"] >= reports + 2, 60, "stats")
            stats = info["stats"]
            print(f"\n[{PEER}] features {feats.group(1)} stats {stats}")
            # free page hinting: a new command id; Linux hints its free pages under it
            # and ends with CMD_ID_STOP; DONE then lets it reuse them
            cmd = balloon_command(str(ctl), "hint start")["cmd_id"]
            info = _wait_info(ctl, lambda i: i["hinted_bytes"] > 0, 60, "free page hints")
            balloon_command(str(ctl), "hint done")
            hinted = info["hinted_bytes"]
            balloon_command(str(ctl), "target 0")
            info = _wait_info(ctl, lambda i: i["actual"] == 0, 180, "actual 0 (deflate)")
            assert info["inflated_pages"] == 0
            done = guest.wait_for(r"GUEST-LOW (\d+)", 120)
            assert done is not None, guest.diagnostics()
            lowest = int(done.group(1))
            assert guest.wait_for("GUEST-DONE", 30) is not None, guest.diagnostics()
        info = balloon_command(str(ctl), "info")
        print(
            f"[{PEER}] MemTotal {mem0} kB -> {lowest} kB -> back; hint round {cmd}: "
            f"{hinted} bytes hinted; QEMU guest RAM memfd allocated {ram_before} -> "
            f"{ram_inflated} bytes around the inflation; back-end {info}"
        )
        negotiated = feats.group(1)  # /sys/.../features: one character per bit
        assert negotiated[1] == "1" and negotiated[5] == "1"  # STATS_VQ, REPORTING
        assert negotiated[3] == "1" and negotiated[2] == "0"  # FREE_PAGE_HINT, no OOM
        assert info["stats_reports"] >= 3
        # the guest hands free pages to the balloon, mostly never touched: the memfd's
        # allocation need not drop; it must not exceed guest RAM
        assert ram_inflated <= MEM_MIB << 20
        assert mem0 - lowest >= TARGET * 4 - 4096  # kB, 64 MiB less a little slack
        assert {"memtot", "memfree"} <= set(stats)
        assert stats["memtot"] <= mem0 * 1024
        assert re.search(r"balloon: actual 16384 pages", be.log()), be.log()
