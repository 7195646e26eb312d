"""A bare ZeroMQ DEALER that speaks the wire protocol by hand.

Tests use it to reach one chosen instance (the client would pick one for
them) and to send what no meshkit client would ever send.
"""

from __future__ import annotations

import itertools
from typing import Any

import zmq

from meshkit import wire


class RawPeer:
    """One DEALER connected to ``endpoint``; close it (or use ``with``) when done."""

    _ids = itertools.count(1000)

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 3.0) -> list[bytes] | None:
        """The next message, or None if none arrives within ``timeout`` seconds."""
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return self.sock.recv_multipart()

    def answer(self, frames: list[bytes], timeout: float = 3.0) -> tuple[wire.Header, Any]:
        """Send ``frames`` and return the decoded answer (header, body)."""
        self.send(frames)
        reply = self.recv(timeout)
        assert reply is not None, f"no answer within {timeout}s to {frames!r:.200}"
        assert len(reply) == 2, f"answer has {len(reply)} frames"
        return wire.decode_header(reply[0]), wire.unpack(reply[1])

    def call(self, service: str, method: str, args: list[Any] | None = None,
             timeout: float = 3.0) -> Any:
        """Call ``method`` on this very instance; return the result (assert it is a REPLY)."""
        request_id = next(self._ids)
        header, body = self.answer(
            wire.encode_call(request_id, service, method, args or [], {}, int(timeout * 1000),
                             None, None),
            timeout,
        )
        assert header.id == request_id
        assert header.kind == wire.REPLY, f"{service}.{method} answered {body!r}"
        return body

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
