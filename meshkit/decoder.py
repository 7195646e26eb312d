"""MessagePack decoding under :mod:`meshkit.wire` that a peer cannot make expensive.

Two things the wire module needs and MessagePack does not give:

* :func:`unpack_body` decodes a body counting its arrays and maps as they are
  built, and stops past a limit. One byte (``0x90``) decodes to an empty
  list of ~64 bytes, so without it 8 MiB of them would become 512 MiB of
  objects; the count is also what a request is charged for them
  (:mod:`meshkit.budget`).
* :func:`peek_id` reads the id of a header that cannot be decoded whole (a
  truncated item, trailing garbage, an item nested deeper than the decoder's
  stack allows) by walking just its first three items without building
  them: iteratively, so nesting depth costs nothing, and within the first
  :data:`ID_PEEK_BYTES` bytes, so the work is bounded whatever the frame holds.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ProtocolError
from .untrusted import clip

__all__ = ["CONTAINER_COST", "ID_PEEK_BYTES", "MAX_BODY_CONTAINERS", "peek_id", "unpack_body", "why"]

# Arrays and maps one body may decode to (default of Settings.max_body_containers).
MAX_BODY_CONTAINERS = 100_000
CONTAINER_COST = 64  # bytes: an empty list or dict, and its slot in the parent

# How far into a malformed header the id is looked for: the three common
# items of any real header fit in a few dozen bytes.
ID_PEEK_BYTES = 4096
_MAX_ID = 2**64 - 1


def peek_id(frame: bytes) -> int:
    """The id of a header that cannot be decoded whole, or 0 if it cannot be read.

    Looks only at the first :data:`ID_PEEK_BYTES` bytes: the frame must start
    with an array of at least 3 items whose first two are complete MessagePack
    values (skipped without building them, so nesting depth does not matter)
    followed by an unsigned 64-bit integer. Never raises.
    """
    head = frame[:ID_PEEK_BYTES]
    try:
        count, pos = _container_head(head, 0, _ARRAYS)
        if count < 3:
            return 0
        pos = _skip(head, pos, 2)
        value = msgpack.Unpacker(raw=False, max_buffer_size=len(head))
        value.feed(head[pos:pos + 9])
        id = value.unpack()
    except Exception:  # truncated, not an array, not MessagePack: no id
        return 0
    return id if type(id) is int and 0 <= id <= _MAX_ID else 0


# MessagePack type bytes: (fixed payload length, length-field size) for the
# scalar types, so values can be skipped without decoding them.
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin and str: length, then bytes
_EXTS = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length, type byte, then bytes
_ARRAYS = {0xDC: 2, 0xDD: 4}
_MAPS = {0xDE: 2, 0xDF: 4}


def _container_head(buf: bytes, pos: int, kinds: dict[int, int]) -> tuple[int, int]:
    """``(item count, position after the head)`` of the array at ``pos``; ValueError if none."""
    b = buf[pos]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F, pos + 1
    size = kinds.get(b)
    if size is None:
        raise ValueError("not an array")
    return int.from_bytes(buf[pos + 1:pos + 1 + size], "big"), pos + 1 + size


def _skip(buf: bytes, pos: int, count: int) -> int:
    """Position after ``count`` complete values from ``pos`` (iterative: any depth).

    Raises IndexError/ValueError if the buffer ends first or holds the
    never-used byte. Each value consumes at least one byte, so the work is
    bounded by ``len(buf)`` whatever the counts claim.
    """
    end = len(buf)
    while count:
        if pos >= end:
            raise IndexError("truncated")
        b = buf[pos]
        count -= 1
        if b <= 0x7F or b >= 0xE0:
            pos += 1
        elif b <= 0x8F:
            count += 2 * (b & 0x0F)
            pos += 1
        elif b <= 0x9F:
            count += b & 0x0F
            pos += 1
        elif b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b in _FIXED:
            pos += 1 + _FIXED[b]
        elif b in _SIZED or b in _EXTS:
            size = _SIZED.get(b) or _EXTS[b]
            length = int.from_bytes(buf[pos + 1:pos + 1 + size], "big")
            pos += 1 + size + (1 if b in _EXTS else 0) + length
        elif b in _ARRAYS:
            items, pos = _container_head(buf, pos, _ARRAYS)
            count += items
        elif b in _MAPS:
            size = _MAPS[b]
            count += 2 * int.from_bytes(buf[pos + 1:pos + 1 + size], "big")
            pos += 1 + size
        else:
            raise ValueError("never-used type byte")
    if pos > end:
        raise IndexError("truncated")
    return pos


class _TooManyContainers(Exception):
    pass


class _ContainerCount:
    """A ``list_hook``/``object_hook`` counting containers, stopping past ``limit``."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit

    def __call__(self, value: Any) -> Any:
        self.count += 1
        if self.count > self.limit:
            raise _TooManyContainers()
        return value


def unpack_body(frame: bytes, max_containers: int = MAX_BODY_CONTAINERS) -> tuple[Any, int]:
    """Decode a body that may hold at most ``max_containers`` arrays and maps.

    Returns ``(value, containers)``: the caller charges what the containers
    take decoded (see :mod:`meshkit.budget`). ``bad_request`` if the body
    holds more (decoding stops there, so neither time nor memory grows with
    what follows) or is not MessagePack.
    """
    count = _ContainerCount(max_containers)
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=False, list_hook=count, object_hook=count)
    except _TooManyContainers:
        raise ProtocolError("bad_request", f"body holds more than {max_containers} arrays and maps") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("bad_request", f"frame is not valid MessagePack: {why(exc)}") from None
    return value, count.count


def why(exc: BaseException) -> str:
    """A short description of a decoding failure (msgpack's messages may quote the input)."""
    return f"{type(exc).__name__}: {clip(str(exc))}" if str(exc) else type(exc).__name__
