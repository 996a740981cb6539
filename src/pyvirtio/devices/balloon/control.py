"""A control socket for a balloon being served: set the target, read ``actual`` and
the statistics while the guest runs.

``pyvirtio serve balloon --socket S --control C`` listens on the unix socket ``C``.
Each connection sends one line and gets one JSON line back, then is closed::

    target 32768        # pages of 4 KiB the guest should give up (also: target 128M)
    info                # {"num_pages", "actual", "inflated_pages", "stats", ...}
    stats               # ask the driver for a new statistics report now
    hint start|stop|done  # free page hinting rounds (VIRTIO_BALLOON_F_FREE_PAGE_HINT)

for example ``echo 'target 16384' | socat - UNIX-CONNECT:C`` or
:func:`balloon_command`. The listening socket is one more host event source of the
device (:attr:`~pyvirtio.core.device.VirtioDevice.events`): whichever transport
serves the device accepts connections in its own loop, under the device lock.
"""

from __future__ import annotations

from typing import Any

from pyvirtio.devices.balloon.device import BalloonDevice
from pyvirtio.devices.control import ControlSocket, control_command
from pyvirtio.errors import ConfigurationError
from pyvirtio.spec.balloon import PFN_SIZE

__all__ = ["BalloonControl", "balloon_command", "parse_pages"]


def parse_pages(text: str) -> int:
    """``32768`` (pages) or ``128M`` / ``1G`` / ``64k`` (bytes, rounded down to 4 KiB
    pages) -> pages."""
    t = text.strip()
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    suffix = t[-1:].lower()
    if suffix in units:
        t = t[:-1].removesuffix("i")
        return (int(t, 0) << units[suffix]) // PFN_SIZE
    return int(t.removesuffix("B"), 0) if t.endswith("B") else int(t, 0)


class BalloonControl(ControlSocket):
    """Serve the control protocol (module docs) for ``device`` on unix socket ``path``."""

    max_line = 256

    def __init__(self, device: BalloonDevice, path: str) -> None:
        super().__init__(device, path)
        self.device: BalloonDevice = device

    def command(self, line: str) -> dict[str, Any]:
        """Run one command line; returns the reply (``{"error": ...}`` if bad)."""
        dev = self.device
        words = line.split()
        try:
            if not words or words[0] == "info":
                pass
            elif words[0] == "target" and len(words) == 2:
                dev.set_target(parse_pages(words[1]))
            elif words[0] == "stats":
                return {"requested": dev.request_stats()}
            elif words[0] == "hint" and len(words) == 2 and words[1] in ("start", "stop", "done"):
                if words[1] == "start":
                    return {"cmd_id": dev.start_hinting()}
                (dev.stop_hinting if words[1] == "stop" else dev.done_hinting)()
            else:
                return {"error": f"unknown command {line.strip()!r}"}
        except (ValueError, ConfigurationError) as e:
            return {"error": str(e)}
        return info(dev)


def info(dev: BalloonDevice) -> dict[str, Any]:
    """What the balloon knows now, as JSON-able values."""
    with dev.lock:
        return {
            "num_pages": dev.num_pages,
            "actual": dev.actual,
            "inflated_pages": dev.inflated_pages,
            "features": dev.features,
            "stats": {t.name.lower(): v for t, v in sorted(dev.stats.items())},
            "stats_reports": dev.counters.stats_reports,
            "free_page_hint_cmd_id": dev.free_page_hint_cmd_id,
            "hinted_bytes": dev.counters.hinted_bytes,
            "reported_bytes": dev.counters.reported_bytes,
            "discarded_bytes": dev.counters.discarded_bytes,
            "pfn_outside_ram": dev.counters.pfn_outside_ram,
            "poison_val": dev.poison_val,
            "ram_allocated_bytes": dev.ram_allocated(),
        }


#: the client side: one command, the JSON reply
balloon_command = control_command
