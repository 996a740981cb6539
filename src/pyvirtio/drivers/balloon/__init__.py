"""The traditional memory balloon driver (virtio-v1.2 §5.5)."""

from __future__ import annotations

from pyvirtio.drivers.balloon.driver import PFNS_PER_REQUEST, BalloonDriver

__all__ = ["PFNS_PER_REQUEST", "BalloonDriver"]
