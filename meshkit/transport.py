"""ZeroMQ sockets driven by the asyncio loop, without a future per message.

ZeroMQ's file descriptor is edge-triggered: it signals that the socket's
state *may* have changed, and any send or receive can consume that signal.
So a :class:`SocketPump` reads until ``EVENTS`` says there is nothing left,
and re-checks after every send it makes (:meth:`SocketPump.send`). Reading a
whole batch per wake-up, with no future per message, is what lets meshkit
keep up with (and pipelined, beat) a plain ``zmq.asyncio`` loop.

All sockets are used from the loop's thread only; ZeroMQ sockets are not
thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq

log = logging.getLogger("meshkit.transport")

MessageHandler = Callable[[list[bytes]], None]

# Messages handled per wake-up before yielding to other tasks, so a flood on
# one socket cannot starve heartbeats and handlers.
_BATCH = 256


class SocketPump:
    """Feeds every message arriving on ``sock`` to ``on_message`` in the loop.

    ``on_message`` must not raise; exceptions are logged and the message is
    dropped, because one bad message must never stop the socket.
    """

    def __init__(self, sock: zmq.Socket[bytes], on_message: MessageHandler) -> None:
        self.sock = sock
        self.on_message = on_message
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._fd = -1

    def start(self) -> None:
        """Begin delivering messages (call from the loop's thread)."""
        self._loop = asyncio.get_running_loop()
        self._fd = self.sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        self.kick()

    def stop(self) -> None:
        """Stop delivering messages; the socket stays open."""
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False if ZeroMQ would block (peer unreachable or full)."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        finally:
            self.kick()
        return True

    def kick(self) -> None:
        """Schedule a read pass (needed after any send: see the module doc)."""
        if not self._scheduled and self._loop is not None and self._fd >= 0:
            self._scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._scheduled = False
        sock = self.sock
        if self._fd < 0 or sock.closed:
            return
        for _ in range(_BATCH):
            if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except Exception:
                log.exception("message handler failed; message dropped")
            if self._fd < 0 or sock.closed:
                return  # the handler stopped the pump or closed the socket
        self.kick()
