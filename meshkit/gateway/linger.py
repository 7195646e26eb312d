"""How a client connection's socket goes away: delivered within a bound, else reset.

asyncio's ``transport.close()`` waits for its write buffer to drain, however
long that takes, and once it closes the socket the kernel keeps an orphaned
socket until the peer has acknowledged everything queued in it. A client
that stopped reading (behind HAProxy: an HAProxy whose own client stopped
reading) would keep both for as long as its TCP stays up: megabytes of
buffers, a file descriptor on the gateway's side, and a session in HAProxy
until its server timeout (an hour). So a gateway closes in one of two ways:

* :func:`close_within` waits, up to a bound, until nothing written is left
  unacknowledged (the transport's buffer and the kernel's send queue are
  both empty), then closes. Past the bound it resets.
* :func:`reset` sends a TCP RST (``SO_LINGER`` with a zero timeout) and
  aborts the transport: the kernel drops what is queued at once, and the
  peer (HAProxy, which then closes its client) learns at once.

Either way the socket is closed when asyncio's ``connection_lost`` runs,
one loop iteration later.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Any

# Polling the kernel's send queue: quick at first (a reading client empties
# it within a millisecond on a LAN), then every 100 ms up to the bound.
_FIRST_POLL = 0.005
_MAX_POLL = 0.1


def unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that the peer has not acknowledged yet.

    The transport's own buffer plus, where the platform tells (Linux's
    ``SIOCOUTQ``, the same number as ``TIOCOUTQ``), the kernel's send queue.
    """
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return pending
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return pending  # not a platform that tells: the transport's buffer is all we know
    queued: int = struct.unpack("i", raw)[0]
    return pending + max(0, queued)


def reset(transport: asyncio.WriteTransport) -> None:
    """Close ``transport`` at once with a TCP RST, dropping whatever is still queued."""
    sock: Any = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # not TCP (a unix socket in tests): abort alone drops the data
    transport.abort()


async def close_within(transport: asyncio.WriteTransport, timeout: float) -> bool:
    """Close once everything written is acknowledged, or reset after ``timeout`` seconds.

    Returns True if everything was delivered (or the peer had closed the
    connection already), False if the connection had to be reset.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = _FIRST_POLL
    while not transport.is_closing() and unsent(transport):
        remaining = deadline - loop.time()
        if remaining <= 0:
            reset(transport)
            return False
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL)
    transport.close()
    return True
