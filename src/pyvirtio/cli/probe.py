"""``pyvirtio probe``: ask any vhost-user back-end what it offers.

Connects as a vhost-user front-end (:class:`~pyvirtio.transport.vhost_user.frontend.
VhostUserFrontend`) and prints the device type (given with ``--type`` or guessed: the
protocol has no device-type message), the virtio feature bits and the protocol
features the back-end offers, by their spec names, the queue count and the
configuration space decoded field by field. ``--exercise`` then runs a
non-destructive functional check with a pyvirtio driver: block devices are read
(first and last 4 KiB, the device ID), entropy devices give random bytes.

::

    pyvirtio probe --socket /tmp/vhost-blk.sock --exercise
    pyvirtio probe --socket /tmp/vhost-rng.sock --type rng --json
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from pyvirtio.devices.registry import by_id, by_name, device_types, guess_device_id
from pyvirtio.errors import ConfigurationError, ProtocolError
from pyvirtio.spec.features import Feature, feature_names, has
from pyvirtio.spec.ids import DeviceId
from pyvirtio.spec.layout import WireStruct
from pyvirtio.transport.vhost_user.frontend import (
    DEFAULT_REPLY_TIMEOUT,
    VHOST_ONLY_FEATURES,
    VhostUserFrontend,
)
from pyvirtio.transport.vhost_user.spec import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
)

__all__ = [
    "decode_config",
    "device_feature_names",
    "probe",
    "protocol_feature_names",
    "register",
    "run",
]

#: names of the GET_FEATURES bits that belong to vhost, not to the device
_VHOST_NAMES = {
    VHOST_F_LOG_ALL: "VHOST_F_LOG_ALL",
    VHOST_USER_F_PROTOCOL_FEATURES: "VHOST_USER_F_PROTOCOL_FEATURES",
}


def _type_name(device_id: int) -> str:
    if device_id == 0:
        return "unknown: vhost-user does not say, pass --type"
    try:
        return DeviceId(device_id).name.lower()
    except ValueError:
        return "unknown"


def device_feature_names(features: int, device_id: int) -> list[str]:
    """Spec names of GET_FEATURES bits: ``VIRTIO_F_*``, the device type's own bits
    (from its registry entry: ``VIRTIO_BLK_F_*`` for block devices) and the vhost bits
    26 and 30."""
    extra = dict(_VHOST_NAMES)
    entry = by_id(device_id) if device_id else None
    if entry is not None:
        extra.update(entry.feature_names)
    return feature_names(features, extra)


def protocol_feature_names(features: int) -> list[str]:
    """``VHOST_USER_PROTOCOL_F_*`` names of the bits set in ``features``."""
    out: list[str] = []
    n = 0
    while features >> n:
        if features >> n & 1:
            try:
                out.append(ProtocolFeature(n).spec_name)
            except ValueError:
                out.append(f"bit{n}")
        n += 1
    return out


def decode_config(layout: WireStruct[Any], data: bytes) -> dict[str, int]:
    """Every field of ``layout`` that lies wholly inside ``data``, by name."""
    out: dict[str, int] = {}
    for name in layout.names:
        st = layout.field_struct(name)
        off = layout.offset_of(name)
        if off + st.size <= len(data):
            out[name] = int(st.unpack_from(data, off)[0])
    return out


def _read_config(t: VhostUserFrontend, device_id: int) -> tuple[dict[str, int] | None, str]:
    """The decoded configuration and a note on how much could be read."""
    entry = by_id(device_id) if device_id else None
    layout: WireStruct[Any] | None = None if entry is None else entry.config_layout
    if layout is None:
        return None, "none defined for this device type"
    if not t.has_config:
        return None, "not readable (VHOST_USER_PROTOCOL_F_CONFIG not offered)"
    # some back-ends serve only a prefix of the layout: try shorter reads
    for size in (layout.size, 24, 8):
        data = t.try_read_config(size)
        if data is not None:
            return decode_config(layout, data), f"{size} bytes"
    return None, "the back-end refused to read it"


def probe(
    socket_path: str,
    device_type: str = "auto",
    *,
    exercise: bool = False,
    timeout: float = DEFAULT_REPLY_TIMEOUT,
) -> dict[str, Any]:
    """Connect to the back-end at ``socket_path`` and describe it (a JSON-able dict).

    ``device_type`` is a registered device type's name (``"blk"``, ``"rng"`` ...) or
    ``"auto"`` (guess). With ``exercise`` the matching driver runs the type's
    non-destructive check; its outcome is under ``"exercise"``. Raises
    :class:`~pyvirtio.errors.ConfigurationError` if the type cannot be determined for
    ``exercise``.
    """
    given = None if device_type == "auto" else by_name(device_type)
    with VhostUserFrontend(socket_path, reply_timeout=timeout) as t:
        if given is None:
            prefix = t.try_read_config(24)
            device_id = guess_device_id(
                t.backend_features & ~VHOST_ONLY_FEATURES, prefix, t.backend_queue_num
            )
            how = "guessed from the features and configuration offered"
        else:
            device_id = given.device_id
            how = "given with --type"
        if device_id:
            t.assume_device(device_id)
        config, config_note = _read_config(t, device_id)
        virtio = t.backend_features & ~VHOST_ONLY_FEATURES
        info: dict[str, Any] = {
            "socket": socket_path,
            "device_type": {"id": device_id, "name": _type_name(device_id), "source": how},
            "features": {
                "offered": t.backend_features,
                "virtio": device_feature_names(virtio, device_id),
                "vhost": device_feature_names(t.backend_features & VHOST_ONLY_FEATURES, 0),
                "ring": {
                    "packed": has(virtio, Feature.RING_PACKED),
                    "indirect": has(virtio, Feature.INDIRECT_DESC),
                    "event_idx": has(virtio, Feature.EVENT_IDX),
                    "in_order": has(virtio, Feature.IN_ORDER),
                },
            },
            "protocol_features": {
                "offered": t.protocol_features_offered,
                "names": protocol_feature_names(t.protocol_features_offered),
                "used": protocol_feature_names(t.protocol_features),
            },
            "queues": {
                "count": t.num_queues(),
                "source": "GET_QUEUE_NUM"
                if t.backend_queue_num is not None
                else "fixed for the device type (no VHOST_USER_PROTOCOL_F_MQ)",
            },
            "config": {"fields": config, "note": config_note},
        }
        if exercise:
            entry = by_id(device_id) if device_id else None
            if entry is None or entry.exercise is None:
                names = ", ".join(e.name for e in device_types() if e.exercise is not None)
                raise ConfigurationError(
                    f"cannot tell the device type to exercise: pass --type ({names})"
                )
            info["exercise"] = entry.exercise(t)
    return info


def _wrap(names: list[str]) -> str:
    if not names:
        return "    (none)"
    return textwrap.fill(" ".join(names), width=96, initial_indent="    ", subsequent_indent="    ")


def _print_text(info: dict[str, Any]) -> None:
    dt = info["device_type"]
    feats = info["features"]
    proto = info["protocol_features"]
    print(f"vhost-user back-end at {info['socket']}")
    print(f"device type: {dt['id']} ({dt['name']}), {dt['source']}")
    print(f"virtio features offered: {feats['offered'] & ~VHOST_ONLY_FEATURES:#x}")
    print(_wrap(feats["virtio"]))
    print("vhost features offered:")
    print(_wrap(feats["vhost"]))
    print(f"protocol features offered: {proto['offered']:#x}")
    print(_wrap(proto["names"]))
    print("protocol features used by pyvirtio:")
    print(_wrap(proto["used"]))
    q = info["queues"]
    print(f"queues: {q['count']} ({q['source']})")
    cfg = info["config"]
    fields = cfg["fields"]
    entry = by_id(dt["id"]) if dt["id"] else None
    print(f"configuration space: {cfg['note']}")
    if fields:
        width = max(len(k) for k in fields)
        for name, value in fields.items():
            extra = entry.config_note(name, value) if entry is not None else ""
            print(f"    {name:<{width}} = {value}{extra}")
    ex = info.get("exercise")
    if ex is not None:
        print(f"exercise ({ex['ring']} ring): OK")
        if entry is not None:
            for line in entry.describe_exercise(ex):
                print(line)


def run(args: argparse.Namespace) -> int:
    """Run ``pyvirtio probe`` with parsed arguments."""
    try:
        info = probe(args.socket, args.type, exercise=args.exercise, timeout=args.timeout)
    except ProtocolError as e:
        print(f"pyvirtio probe: the back-end broke the vhost-user protocol: {e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_text(info)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``probe`` sub-command."""
    p = subparsers.add_parser(
        "probe",
        help="connect to a vhost-user back-end as front-end and describe what it offers",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="the back-end's unix socket")
    p.add_argument(
        "--type",
        choices=["auto", *(e.name for e in device_types())],
        default="auto",
        help="device type served (vhost-user cannot tell; default: guess)",
    )
    p.add_argument(
        "--exercise",
        action="store_true",
        help="run the device type's non-destructive check with a pyvirtio driver "
        "(blk: reads; rng: entropy)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_REPLY_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline for each reply of the back-end (default {DEFAULT_REPLY_TIMEOUT:g})",
    )
    p.set_defaults(func=run)
