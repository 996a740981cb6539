"""The ``pyvirtio`` command line (demo, serve, probe)."""
