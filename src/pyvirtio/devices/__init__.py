"""Device models: the device's point of view, one package per device type.

Each package declares its :class:`~pyvirtio.devices.registry.DeviceType` as
``DEVICE_TYPE``; :mod:`pyvirtio.devices.registry` finds them.
"""
