"""Device models: the device's point of view (block, entropy)."""
