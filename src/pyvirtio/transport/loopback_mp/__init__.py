"""Loopback transport across two processes: a driver process and a device process.

The driver process owns guest RAM (memfd) and the eventfds; it hands them to the
device process over a unix socket pair (``SCM_RIGHTS``) and drives the device with
request/response control messages (:mod:`.protocol`, sans-I/O). Notifications are
eventfd writes in both directions, as with vhost-user.

- :mod:`.driver_side`: :class:`~.driver_side.MultiprocessLoopbackTransport` (a
  ``DriverTransport``), :class:`~.driver_side.DeviceProcess` (spawns
  ``python -m pyvirtio.transport.loopback_mp.device_side`` and reaps it) and
  :func:`~.driver_side.connect`.
- :mod:`.device_side`: :class:`~.device_side.DeviceServer` (request handling around
  a :class:`~pyvirtio.core.device_state.DeviceState`) and :func:`~.device_side.serve`
  (the selectors loop), plus the device process's ``main``.
"""
