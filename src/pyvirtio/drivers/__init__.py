"""Drivers: the driver's point of view (block, entropy)."""
