"""vhost-user transport: pyvirtio devices served to real VMs (QEMU, cloud-hypervisor, ...).

The protocol is QEMU's ``docs/interop/vhost-user.rst``. :mod:`.spec` declares its
constants and message layouts, :mod:`.codec` is the sans-I/O codec (bytes and file
descriptors in, validated :class:`~.codec.Message` objects out, and back).
"""

from __future__ import annotations

from pyvirtio.transport.vhost_user.codec import (
    Channel,
    Decoder,
    KickMode,
    Message,
    MessageRejected,
    RingState,
    RingTracker,
    check_memory_regions,
    encode,
    encode_ack,
    encode_reply,
    error_reply,
)
from pyvirtio.transport.vhost_user.spec import (
    BackendRequest,
    FrontendRequest,
    HeaderFlags,
    ProtocolFeature,
)

__all__ = [
    "BackendRequest",
    "Channel",
    "Decoder",
    "FrontendRequest",
    "HeaderFlags",
    "KickMode",
    "Message",
    "MessageRejected",
    "ProtocolFeature",
    "RingState",
    "RingTracker",
    "check_memory_regions",
    "encode",
    "encode_ack",
    "encode_reply",
    "error_reply",
]
