"""The virtio network device (virtio-v1.2 §5.1 "Network Device") and its host back-ends."""

from pyvirtio.devices.net.backend import NetBackend, SocketBackend, TapBackend
from pyvirtio.devices.net.device import NetDevice, random_mac
from pyvirtio.devices.net.entry import DEVICE_TYPE
from pyvirtio.devices.net.filter import RxFilter
from pyvirtio.devices.net.switch import Switch, SwitchPort

__all__ = [
    "DEVICE_TYPE",
    "NetBackend",
    "NetDevice",
    "RxFilter",
    "SocketBackend",
    "Switch",
    "SwitchPort",
    "TapBackend",
    "random_mac",
]
