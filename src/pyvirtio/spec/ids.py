"""Device IDs. virtio-v1.2 §5 "Device Types"."""

from __future__ import annotations

from enum import IntEnum


class DeviceId(IntEnum):
    """Virtio device IDs (virtio-v1.2 §5 "Device Types", table of device IDs)."""

    RESERVED = 0
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON_TRADITIONAL = 5
    IOMEMORY = 6
    RPMSG = 7
    SCSI = 8
    TRANSPORT_9P = 9
    MAC80211_WLAN = 10
    RPROC_SERIAL = 11
    CAIF = 12
    BALLOON = 13
    GPU = 16
    TIMER = 17
    INPUT = 18
    SOCKET = 19
    CRYPTO = 20
    SIGNAL_DIST = 21
    PSTORE = 22
    IOMMU = 23
    MEMORY = 24
    SOUND = 25
    FS = 26
    PMEM = 27
    RPMB = 28
    MAC80211_HWSIM = 29
    VIDEO_ENCODER = 30
    VIDEO_DECODER = 31
    SCMI = 32
    NITRO_SEC_MOD = 33
    I2C_ADAPTER = 34
    WATCHDOG = 35
    CAN = 36
    PARAMETER_SERVER = 38
    AUDIO_POLICY = 39
    BLUETOOTH = 40
    GPIO = 41
    RDMA = 42


#: Queues a device type has when it has no multiqueue feature: the count its
#: "Virtqueues" section gives (virtio-v1.2 §5, each device type's "Virtqueues"; the
#: console's without VIRTIO_CONSOLE_F_MULTIPORT, the network device's without
#: VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ). A vhost-user front-end sets up this
#: many when the back-end has no VHOST_USER_PROTOCOL_F_MQ. Types not listed have one.
FIXED_QUEUES: dict[int, int] = {
    DeviceId.NET: 2,
    DeviceId.BLOCK: 1,
    DeviceId.CONSOLE: 2,
    DeviceId.ENTROPY: 1,
    DeviceId.SCSI: 3,
    DeviceId.INPUT: 2,
    DeviceId.SOCKET: 3,
    DeviceId.GPIO: 2,
    DeviceId.I2C_ADAPTER: 1,
}
