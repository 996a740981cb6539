"""Drivers: the driver's point of view (block, network, entropy)."""
