"""The virtio entropy driver (virtio-v1.2 §5.4 "Entropy Device")."""

from __future__ import annotations

from pyvirtio.drivers.rng.driver import REQUESTQ, RngDriver, RngTimeoutError

__all__ = ["REQUESTQ", "RngDriver", "RngTimeoutError"]
