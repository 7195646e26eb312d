"""A connection to one remote instance, and what is in flight on it.

Each :class:`Peer` owns a ``DEALER`` connected to the instance's router and a
monitor socket that reports the TCP connection's fate. Liveness is decided
from those events, not from the registry:

* the connection drops (the process died, so the kernel closed it) or ZeroMQ's
  own heartbeat (``ZMQ_HEARTBEAT_IVL``/``TIMEOUT``, from ``Settings.ping_after``
  and ``dead_after``) times out (the host or process hangs) — the peer is
  **lost**: requests in flight may have run;
* no connection is made within ``dead_after`` — the peer is **unreachable**:
  nothing was delivered, and closing the socket with ``LINGER 0`` makes sure
  nothing ever will be.

Either way the socket is closed and every request waiting on it is failed
through its :class:`Pending` so the client can retry or report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import curve
from .config import Settings
from .errors import ConfigError
from .record import InstanceRecord
from .transport import SocketPump

log = logging.getLogger("meshkit.peer")

CONNECTING = "connecting"
CONNECTED = "connected"
FAILED = "failed"

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


@dataclass(slots=True)
class Pending:
    """A request waiting for its answer on one peer.

    ``on_answer(kind, body_frame)`` is called with the answer; ``on_fail(lost)``
    when the peer fails first (``lost`` is False if it was never reached).
    """

    on_answer: Callable[[int, bytes], None]
    on_fail: Callable[[bool], None]


class Peer:
    """One remote instance as seen from this process."""

    def __init__(
        self,
        record: InstanceRecord,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: Settings,
        on_message: Callable[[Peer, list[bytes]], None],
        on_state: Callable[[Peer], None],
    ) -> None:
        self.record = record
        self.key = record.key
        self.settings = settings
        self.state = CONNECTING
        self.draining = not record.is_up  # also set when it answers "draining"
        self.pending: dict[int, Pending] = {}
        self.failed_at = 0.0
        self._on_state = on_state
        self._created = time.monotonic()
        sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(50, int(settings.ping_after * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(100, int(settings.dead_after * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(settings.dead_after * 1000)))
        try:
            curve.apply_client(sock, record.curve_key, settings)  # CurveZMQ when on (meshkit.curve)
        except ConfigError:
            sock.close(linger=0)
            raise
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        sock.connect(record.endpoint)
        self.sock = sock
        self.pump = SocketPump(sock, functools.partial(on_message, self))
        self._monitor_pump = SocketPump(self._monitor, self._on_monitor)
        self.pump.start()
        self._monitor_pump.start()
        loop = asyncio.get_running_loop()
        self._connect_timer: asyncio.TimerHandle | None = loop.call_later(
            settings.dead_after, self._connect_timeout
        )

    @property
    def available(self) -> bool:
        """Whether new work may be sent here."""
        return self.state != FAILED and not self.draining

    @property
    def load(self) -> int:
        return len(self.pending)

    def send(self, frames: list[bytes]) -> bool:
        """Queue frames for the peer; False if it cannot take them (not sent)."""
        if self.state == FAILED:
            return False
        return self.pump.send(frames)

    def update(self, record: InstanceRecord) -> None:
        self.record = record
        if record.is_up and self.draining and self.state != FAILED:
            # The registry says up again (e.g. the drain was cancelled).
            self.draining = False
        elif not record.is_up:
            self.draining = True

    def fail(self, lost: bool, reason: str) -> None:
        """Close the connection and fail everything waiting on it."""
        if self.state == FAILED:
            return
        level = logging.WARNING if self.pending else logging.INFO
        log.log(level, "peer %s at %s %s (%d in flight)", self.key, self.record.endpoint,
                reason, len(self.pending))
        self.state = FAILED
        self.failed_at = time.monotonic()
        self.close()
        pending, self.pending = self.pending, {}
        for item in pending.values():
            item.on_fail(lost)
        self._on_state(self)

    def close(self) -> None:
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self.pump.stop()
        self._monitor_pump.stop()
        if not self.sock.closed:
            self.sock.disable_monitor()
            self.sock.close(linger=0)
        if not self._monitor.closed:
            self._monitor.close(linger=0)

    def _connect_timeout(self) -> None:
        self._connect_timer = None
        # A handshake may have finished just now with its event still queued:
        # read it first, so a request that did reach the peer is not retried
        # elsewhere as "never delivered".
        self._monitor_pump.drain()
        if self.state == CONNECTING:
            self.fail(lost=False, reason=f"not reachable within {self.settings.dead_after:.2f}s")

    def _on_monitor(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.state == CONNECTING:
                self.state = CONNECTED
                if self._connect_timer is not None:
                    self._connect_timer.cancel()
                    self._connect_timer = None
                self._on_state(self)
        elif event == zmq.EVENT_DISCONNECTED:
            self.fail(lost=self.state == CONNECTED, reason="disconnected")
