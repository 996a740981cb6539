"""Shared-memory areas a vhost-user front-end hands over as (fd, size, offset).

The dirty log (``VHOST_USER_SET_LOG_BASE``) and the inflight buffer
(``VHOST_USER_SET_INFLIGHT_FD``) arrive the same way. :func:`map_shared` maps such an
area after checking that it lies inside its file, so that a file shorter than the
peer claims cannot fault the process later; :func:`release_shared` undoes it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat

from pyvirtio.errors import ProtocolError
from pyvirtio.memory.guest_memory import seal_against_shrinking

__all__ = ["map_shared", "release_shared"]


def map_shared(
    fd: int,
    size: int,
    offset: int,
    what: str,
    error: type[ProtocolError],
    clause: str,
    *,
    trusted: bool = False,
) -> tuple[mmap.mmap, memoryview]:
    """Map ``size`` bytes of ``fd`` from ``offset``, shared and writable.

    Returns the mapping and a view of exactly the area. Unless the peer is
    ``trusted``, ``fd`` must be (made) unable to shrink
    (:func:`~pyvirtio.memory.guest_memory.seal_against_shrinking`): the peer could
    otherwise truncate the file under the mapping, and the next access would be
    SIGBUS. That, a file that ends before the area, or a mapping the kernel refuses,
    raises ``error(message, clause)`` naming the area as ``what``.
    """
    if not trusted:
        why = seal_against_shrinking(fd)
        if why is not None:
            raise error(
                f"the {what} cannot be protected against shrinking: {why} (a back-end "
                "that trusts its front-end can accept it: --trust-frontend)",
                clause,
            )
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
        raise error(
            f"{what} [{offset:#x}, +{size:#x}) lies beyond the end of its file "
            f"({st.st_size:#x} bytes)",
            clause,
        )
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    skip = offset - base
    try:
        mapping = mmap.mmap(
            fd,
            size + skip,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
    except (OSError, ValueError, OverflowError) as e:
        raise error(f"cannot map the {what}: {e}", clause) from None
    return mapping, memoryview(mapping)[skip : skip + size]


def release_shared(view: memoryview | None, mapping: mmap.mmap | None, fd: int) -> None:
    """Release ``view``, unmap ``mapping`` and close ``fd`` (each if present).

    A mapping that other views still use is left to the garbage collector; an error
    closing ``fd`` is ignored (it is gone either way).
    """
    if view is not None:
        view.release()
    if mapping is not None:
        with contextlib.suppress(BufferError):
            mapping.close()
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
