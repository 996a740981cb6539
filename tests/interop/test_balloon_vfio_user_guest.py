"""``pyvirtio serve balloon --vfio-user`` against Linux 7.3's virtio_balloon driver.

Peer: the Linux 7.3 ``virtio_balloon`` module (trixie-backports kernel) in a guest under
QEMU 11.1's ``vfio-user-pci`` client (trixie-backports, private trixie root),
generation ``qemu11.1-linux7.3`` only (QEMU 7.2 has no vfio-user client). Our whole
virtio-pci function (configuration space, BARs, MSI-X) serves the balloon; guest RAM
is QEMU's memfd, mapped by the server through DMA_MAP, so an inflated or reported
page given back (a hole punched) shows in the memfd's allocated blocks.

One guest, in order: a target of 64 MiB set on the control socket (the guest's
MemTotal drops by it and ``actual`` follows), statistics every second compared with
the guest's own /proc/meminfo, the target back to 0 (deflate), then free page
reporting: the guest fills 96 MiB of its rootfs (QEMU's memfd grows), deletes it,
and Linux reports the freed 2 MiB blocks on reporting_vq; the server punches them out
and the memfd's allocated bytes drop (measured and printed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from pyvirtio.devices.balloon import balloon_command
from pyvirtio.vm import TRIXIE_GENERATION, GuestVM, build_initramfs
from tests.interop.test_vfio_user_guest import serve_vfio_user
from tests.peer_generations import resolve_peers

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PEER = (
    "Linux 7.3 virtio_balloon (trixie-backports kernel) under QEMU 11.1 vfio-user-pci "
    "(private trixie root)"
)
TARGET = 16384  # pages: 64 MiB
MEM_MIB = 256
FILL_MIB = 96
# no DEFLATE_ON_OOM, so MemTotal shows the balloon; REPORTING for the memfd check
FEATURES = "MUST_TELL_HOST,STATS_VQ,REPORTING"

GUEST_SCRIPT = rf"""
mem() {{ awk '/^MemTotal:/ {{t=$2}} /^MemFree:/ {{f=$2}} END {{print t, f}}' /proc/meminfo; }}
for d in /sys/bus/virtio/devices/*; do
  [ "$(cat $d/device)" = "0x0005" ] || continue
  echo "GUEST-BALLOON $(basename $d) features=$(cat $d/features)"
done
set -- $(mem)
m0=$1
echo "GUEST-MEM0 $m0"
low=$m0
i=0
while [ $i -lt 600 ]; do
  sleep 0.5
  set -- $(mem)
  echo "GUEST-MEM $1 $2"
  [ $1 -lt $low ] && low=$1
  if [ $((m0 - low)) -ge 61440 ] && [ $1 -ge $((m0 - 1024)) ]; then break; fi
  i=$((i + 1))
done
echo "GUEST-LOW $low"
# a quiet spell for the statistics comparison
i=0
while [ $i -lt 16 ]; do sleep 0.5; set -- $(mem); echo "GUEST-MEM $1 $2"; i=$((i + 1)); done
echo "GUEST-IDLE"
dd if=/dev/zero of=/fill.bin bs=1M count={FILL_MIB} 2>/dev/null
sync
echo "GUEST-FILLED $(mem)"
sleep 4
rm /fill.bin
echo "GUEST-FREED $(mem)"
i=0
while [ $i -lt 60 ]; do sleep 0.5; set -- $(mem); echo "GUEST-MEM $1 $2"; i=$((i + 1)); done
echo "GUEST-DONE"
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


def _guest_mems(console: str) -> list[tuple[int, int]]:
    """The guest's ``MemTotal MemFree`` lines so far (kB)."""
    found = [(int(t), int(f)) for t, f in re.findall(r"GUEST-MEM (\d+) (\d+)", console)]
    return found or [(1 << 62, 0)]


def test_linux_balloon_over_vfio_user(tmp_path: Path) -> None:
    """Peer: PEER. Inflate to a target set on the control socket and back, statistics
    against /proc/meminfo, free page reporting shrinking QEMU's guest-RAM memfd."""
    peers = resolve_peers(TRIXIE_GENERATION)
    ird = build_initramfs(
        tmp_path / "initramfs.gz", peers.kernel, GUEST_SCRIPT, modules=["virtio_balloon"]
    )
    ctl = tmp_path / "balloon.ctl"
    args = ["balloon", "--features", FEATURES, "--stats-interval", "1", "--control", str(ctl)]
    with serve_vfio_user(args, tmp_path, "balloon") as be:
        vm = GuestVM(
            peers.kernel.boot_image,
            ird.path,
            memory_mib=MEM_MIB,
            shared_memory=True,
            peer=peers.qemu,
        )
        vm.device(
            json.dumps(
                {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(be.socket_path)}}
            )
        )
        with vm.start(tmp_path / "console.log") as guest:
            m = guest.wait_for(r"GUEST-MEM0 (\d+)", 240)
            assert m is not None, guest.diagnostics() + "\n--- server ---\n" + be.log()[-8000:]
            mem0 = int(m.group(1))
            feats = guest.wait_for(r"GUEST-BALLOON \S+ features=(\d+)", 1)
            assert feats is not None, guest.diagnostics()
            _wait_info(ctl, lambda i: i["stats_reports"] >= 1, 60, "first stats")
            balloon_command(str(ctl), f"target {TARGET}")
            info = _wait_info(ctl, lambda i: i["actual"] == TARGET, 180, "actual (inflate)")
            assert info["inflated_pages"] == TARGET, info
            assert info["discarded_bytes"] >= TARGET * 4096, info
            # the guest sees it: MemTotal down by the target, less slack
            deadline = time.monotonic() + 60
            while min(t for t, _ in _guest_mems(guest.console())) > mem0 - TARGET * 4 + 4096:
                assert time.monotonic() < deadline, guest.diagnostics()
                time.sleep(0.25)
            balloon_command(str(ctl), "target 0")
            info = _wait_info(ctl, lambda i: i["actual"] == 0, 180, "actual 0 (deflate)")
            assert info["inflated_pages"] == 0, info
            low = guest.wait_for(r"GUEST-LOW (\d+)", 60)
            assert low is not None, guest.diagnostics()
            lowest = int(low.group(1))
            # statistics: a fresh report and the guest's MemFree read about then
            reports = info["stats_reports"]
            info = _wait_info(ctl, lambda i: i["stats_reports"] >= reports + 3, 30, "stats")
            stats = info["stats"]
            assert guest.wait_for("GUEST-IDLE", 30) is not None, guest.diagnostics()
            # the guest's MemFree samples of its quiet spell (after GUEST-LOW): the
            # report was taken within it, so one of them is from about the same moment
            quiet = guest.console().split("GUEST-LOW", 1)[1].split("GUEST-IDLE", 1)[0]
            free_samples = [f for _, f in _guest_mems(quiet)]
            # reporting: the memfd before the fill, filled, and after the free
            ram_idle = info["ram_allocated_bytes"]
            assert guest.wait_for("GUEST-FILLED", 60) is not None, guest.diagnostics()
            ram_filled = balloon_command(str(ctl), "info")["ram_allocated_bytes"]
            reported_before = balloon_command(str(ctl), "info")["reported_bytes"]
            assert guest.wait_for("GUEST-FREED", 30) is not None, guest.diagnostics()
            info = _wait_info(
                ctl,
                lambda i: i["ram_allocated_bytes"] <= ram_filled - (FILL_MIB // 2 << 20),
                30,
                "memfd shrinks after the free",
            )
            ram_freed = info["ram_allocated_bytes"]
            reported = info["reported_bytes"] - reported_before
            assert guest.wait_for("GUEST-DONE", 60) is not None, guest.diagnostics()
        result = guest.wait(30)
    log = be.log()
    ctx = result.describe() + "\n--- server ---\n" + log[-8000:]
    stat_free_kb = stats["memfree"] // 1024
    guest_free_kb = min(free_samples, key=lambda f: abs(f - stat_free_kb))
    diff_kb = abs(stat_free_kb - guest_free_kb)
    print(
        f"\n[{PEER}] features {feats.group(1)}\n"
        f"MemTotal {mem0} kB -> lowest {lowest} kB -> back\n"
        f"stats memfree {stat_free_kb} kB vs /proc/meminfo MemFree {guest_free_kb} kB "
        f"(diff {diff_kb} kB), stats {stats}\n"
        f"memfd allocated: idle {ram_idle >> 20} MiB, filled {ram_filled >> 20} MiB, "
        f"after free + reporting {ram_freed >> 20} MiB; {reported >> 20} MiB reported"
    )
    assert result.guest_rc == 0, ctx
    negotiated = feats.group(1)
    assert negotiated[1] == "1" and negotiated[5] == "1", negotiated  # STATS_VQ, REPORTING
    assert negotiated[2] == "0", negotiated  # no DEFLATE_ON_OOM
    assert mem0 - lowest >= TARGET * 4 - 4096, (mem0, lowest)
    assert {"memtot", "memfree"} <= set(stats), stats
    assert stats["memtot"] <= mem0 * 1024
    # The report is Linux's NR_FREE_PAGES at the moment it was sent (the device asks
    # every second), MemFree the same counter read by the shell every half second
    # in the quiet spell after the deflate: the nearest sample is at most a fraction
    # of a second apart, and 10 % or 8 MiB covers the churn of the shell's own forks
    # between the two reads.
    assert diff_kb <= max(guest_free_kb // 10, 8192), (stat_free_kb, guest_free_kb)
    assert ram_filled >= ram_idle + (FILL_MIB // 2 << 20), (ram_idle, ram_filled)
    assert reported >= FILL_MIB // 2 << 20, reported
    m = re.search(r"(\d+) refused, .* (\d+) driver violations", log)
    assert m is not None and m.group(1) == "0", log[-3000:]
    # Linux's virtio_balloon kicks statsq (queue 2) in probe, before
    # virtio_device_ready: logged as a violation, and served at DRIVER_OK; no other
    violations = set(re.findall(r"driver violation: (.*)", log))
    assert violations <= {
        "notification for queue 2 before DRIVER_OK "
        '[virtio-v1.2 §3.1.1 "Driver Requirements: Device Initialization"]'
    }, violations
