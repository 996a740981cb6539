"""Declarative wire-struct layouts: each struct of the spec is declared exactly once.

A :class:`WireStruct` binds a ``NamedTuple`` (the field names, as the spec spells them)
to field types that carry their byte order (``le16``, ``le32``, ``le64``, ``u8``,
``be16`` ...), compiled to a single :class:`struct.Struct`. Code never computes
``offset + 2`` by hand: it asks the layout (``offset_of``) or packs/unpacks whole
structs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: field type name -> (struct byte-order char, struct format char)
FIELD_TYPES: dict[str, tuple[str, str]] = {
    "u8": ("<", "B"),
    "le16": ("<", "H"),
    "le32": ("<", "I"),
    "le64": ("<", "Q"),
    "be16": (">", "H"),
    "be32": (">", "I"),
    "be64": (">", "Q"),
}


def _pad(n: int) -> str:
    return f"{n}x"


class WireStruct(Generic[T]):
    """One wire layout: a NamedTuple type plus the spec's field types.

    ``fields`` is a sequence of ``(name, type)`` pairs where ``type`` is a key of
    :data:`FIELD_TYPES`, ``"padN"`` for N reserved bytes (read as nothing, written as
    zeros) or ``"bytesN"`` for an N-byte array (``u8 mac[6]``: a ``bytes`` value).
    All integer fields must share one byte order.
    """

    def __init__(
        self,
        factory: Callable[..., T],
        fields: Sequence[tuple[str, str]],
    ) -> None:
        orders = {FIELD_TYPES[t][0] for _, t in fields if not t.startswith(("pad", "bytes"))}
        if len(orders) > 1:
            raise ValueError("a wire struct has a single byte order")
        order = orders.pop() if orders else "<"
        fmt = order
        offsets: dict[str, int] = {}
        pos = 0
        names: list[str] = []
        for name, ftype in fields:
            if ftype.startswith("pad"):
                n = int(ftype[3:])
                fmt += _pad(n)
                pos += n
                continue
            ch = f"{int(ftype[5:])}s" if ftype.startswith("bytes") else FIELD_TYPES[ftype][1]
            offsets[name] = pos
            names.append(name)
            fmt += ch
            pos += struct.calcsize("<" + ch)
        self.factory = factory
        self.struct = struct.Struct(fmt)
        self.size: int = self.struct.size
        self.names: tuple[str, ...] = tuple(names)
        self._offsets = offsets
        self._field_structs = {
            name: struct.Struct(
                order + (f"{int(t[5:])}s" if t.startswith("bytes") else FIELD_TYPES[t][1])
            )
            for name, t in fields
            if not t.startswith("pad")
        }
        if self.size != pos:  # pragma: no cover - guarded by construction
            raise AssertionError("layout size mismatch")

    def offset_of(self, name: str) -> int:
        """Byte offset of field ``name`` inside the struct."""
        return self._offsets[name]

    def field_struct(self, name: str) -> struct.Struct:
        """A ``struct.Struct`` for the single field ``name`` (its width and byte order)."""
        return self._field_structs[name]

    def unpack(self, data: bytes | bytearray | memoryview) -> T:
        """Decode exactly ``size`` bytes."""
        return self.factory(*self.struct.unpack(data))

    def unpack_from(self, buf: Any, offset: int = 0) -> T:
        """Decode from ``buf`` at ``offset``."""
        return self.factory(*self.struct.unpack_from(buf, offset))

    def pack(self, value: T) -> bytes:
        """Encode a whole struct."""
        return self.struct.pack(*value)  # type: ignore[misc]

    def pack_values(self, *values: int | bytes) -> bytes:
        """Encode from field values given in declaration order."""
        return self.struct.pack(*values)

    def pack_into(self, buf: Any, offset: int, value: T) -> None:
        """Encode a whole struct into ``buf`` at ``offset``."""
        self.struct.pack_into(buf, offset, *value)  # type: ignore[misc]
