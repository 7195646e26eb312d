"""A connection to one remote instance, and what is in flight on it.

Each :class:`Peer` owns a ``DEALER`` connected to the instance's router and a
monitor socket that reports the TCP connection's fate. Liveness is decided
from those events, not from the registry:

* the connection drops (the process died, so the kernel closed it) or ZeroMQ's
  own heartbeat (``ZMQ_HEARTBEAT_IVL``/``TIMEOUT``, from ``Settings.ping_after``
  and ``dead_after``) times out (the host or process hangs) — the peer is
  **lost**: requests in flight may have run;
* the connection attempt fails (refused: nothing listens there any more) —
  the peer is **unreachable** at once;
* no connection is made within ``dead_after`` — the peer is **unreachable**:
  nothing was delivered, and closing the socket with ``LINGER 0`` makes sure
  nothing ever will be.

Either way the socket is closed and the peer reports that it failed, and
whether it was :attr:`Peer.lost` (connected, so requests in flight may have
run), to its owner; the :class:`~meshkit.exchange.Exchange` settles what was
in flight. The owner changes a peer only through its verbs:
:meth:`~Peer.update` (a new record), :meth:`~Peer.mark_draining` (it answered
``draining``) and :meth:`~Peer.retire` (stop using it).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import curve
from .clock import SYSTEM_CLOCK, Clock, TimerHandle
from .codes import PeerState
from .config import Settings
from .errors import ConfigError
from .record import InstanceRecord
from .transport import SocketPump

log = logging.getLogger("meshkit.peer")

CONNECTING = PeerState.CONNECTING
CONNECTED = PeerState.CONNECTED
FAILED = PeerState.FAILED

# CONNECT_RETRIED: a connect attempt failed (refused, unreachable) before any handshake.
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                   | zmq.EVENT_CONNECT_RETRIED)


class Peer:
    """One remote instance as seen from this process.

    ``on_message(peer, frames)`` gets every message the instance sends;
    ``on_state(peer)`` is called when :attr:`state` or :attr:`draining`
    changed (once with ``FAILED``, which is final).
    """

    def __init__(
        self,
        record: InstanceRecord,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: Settings,
        on_message: Callable[[Peer, list[bytes]], None],
        on_state: Callable[[Peer], None],
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.record = record
        self.key = record.key
        self.settings = settings
        self.state = CONNECTING
        self.draining = not record.is_up  # also set when it answers "draining"
        self.lost = False  # failed while connected: what was in flight may have run
        self.close_linger_ms = 0  # raised by the exchange to let last CANCELs out on close
        self.failed_at = 0.0
        self.reason = ""  # why it failed
        self._on_state = on_state
        self._clock = clock
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
        self._connect_timer: TimerHandle | None = clock.call_later(settings.dead_after, self._connect_timeout)

    @property
    def available(self) -> bool:
        """Whether new work may be sent here."""
        return self.state != FAILED and not self.draining

    def send(self, frames: list[bytes], alone: bool = False) -> bool:
        """Queue frames for the peer; False if it cannot take them (not sent).

        ``alone``: nothing else is in flight to this peer, so no other send is
        expected this turn (see :meth:`meshkit.transport.SocketPump.send`).
        """
        if self.state == FAILED or self.sock.closed:  # closed: by its owner, with requests still queued
            return False
        return self.pump.send(frames, alone)

    def update(self, record: InstanceRecord) -> None:
        """Take the instance's newer record (its state decides :attr:`draining`)."""
        self.record = record
        if record.is_up and self.draining and self.state != FAILED:
            # The registry says up again (e.g. the drain was cancelled).
            self.draining = False
        elif not record.is_up:
            self.draining = True

    def mark_draining(self) -> None:
        """The instance answered ``draining``: send it no new work until its record says ``up``."""
        if not self.draining:
            self.draining = True
            self._on_state(self)

    def retire(self, reason: str) -> None:
        """Stop using this instance now: close the connection; nothing in flight counts as run."""
        self._fail(False, reason)

    def _fail(self, lost: bool, reason: str) -> None:
        if self.state == FAILED:
            return
        self.state = FAILED
        self.lost = lost
        self.reason = reason
        self.failed_at = self._clock.now()
        self.close()
        self._on_state(self)

    def close(self) -> None:
        """Close the sockets (no event is reported; :meth:`retire` is the verb that reports)."""
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self.pump.stop()
        self._monitor_pump.stop()
        if not self.sock.closed:
            self.sock.disable_monitor()
            self.sock.close(linger=self.close_linger_ms)
        if not self._monitor.closed:
            self._monitor.close(linger=0)

    def _connect_timeout(self) -> None:
        self._connect_timer = None
        # A handshake may have finished just now with its event still queued:
        # read it first, so a request that did reach the peer is not retried
        # elsewhere as "never delivered".
        self._monitor_pump.drain()
        if self.state == CONNECTING:
            self._fail(False, f"not reachable within {self.settings.dead_after:.2f}s")

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
            self._fail(self.state == CONNECTED, "disconnected")
        elif event == zmq.EVENT_CONNECT_RETRIED and self.state == CONNECTING:
            # Refused (or otherwise failed) before any handshake: nothing can have
            # been delivered, so say so now rather than after dead_after.
            self._fail(False, "connection refused")
