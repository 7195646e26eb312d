"""The server side of CurveZMQ: a ZAP handler that admits only trusted caller keys.

libzmq asks a ZAP handler (ZeroMQ RFC 27) about every CURVE handshake a
server socket receives, on the in-process endpoint ``inproc://zeromq.zap.01``
of the socket's context. There is one such endpoint per context, so there is
one :class:`ZapHandler` per context, shared by reference count among the
servers of that context; each server registers a :class:`Door` under a ZAP
domain of its own, and the handler asks the door.

A door admits a handshake (``200``) when the client's public key is in the
server's :class:`~meshkit.curve.TrustStore`, and answers with the **User-Id**
set to the service that key speaks for. libzmq attaches that User-Id to
every message of the connection, where the server reads it as the caller's
identity (see :class:`~meshkit.transport.SocketPump`'s ``user_id``): the
identity is the one the handshake authenticated, and a peer cannot choose
or change it afterwards. Anything else is refused (``400``) and counted:

* ``untrusted`` — a CURVE client whose key is not trusted (ZAP refusal);
* ``handshake`` — a peer that failed the handshake before ZAP was asked: no
  CURVE at all (a bare DEALER), the wrong server key, garbage (read from the
  server socket's monitor).

Each refusal is counted in :attr:`Door.refused`, passed to ``on_refused`` (the
server counts ``curve.refused.<reason>`` in its metrics) and logged at most once
per cause per ``log_repeat_interval``, with the peer's address clipped.

The handler must be registered *before* the server socket binds and must
outlive it: libzmq lets any CURVE client in when no handler is listening.
So :func:`apply_server` starts it first and a door holds it until closed,
and ``ZAP_ENFORCE_DOMAIN`` is set where libzmq offers it.

The handler answers from a thread of its own, not from the event loop: a
handshake then completes however busy the server's loop is, as it does
without CURVE (where libzmq's I/O thread alone answers it), so a caller's
``dead_after`` connect deadline means the same with and without CURVE. In
the restart proof under load, new instances whose loop was busy starting up
missed that deadline when ZAP was answered from the loop. A door's counters
and log throttle are shared by that thread and the loop (which reads the
socket monitor) under a lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from . import curve
from .config import Settings
from .errors import ConfigError
from .transport import SocketPump
from .untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
UNTRUSTED = "untrusted"
HANDSHAKE = "handshake"
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

_handlers: weakref.WeakKeyDictionary[zmq.Context[zmq.Socket[bytes]], ZapHandler] = weakref.WeakKeyDictionary()
_domains = itertools.count(1)


class Door:
    """One server socket's CURVE admission: its keypair, trusted callers and refusal counts."""

    def __init__(self, handler: ZapHandler, sock: zmq.Socket[bytes], pair: curve.Keypair,
                 trust: curve.TrustStore, settings: Settings, on_refused: Callable[[str], None]) -> None:
        self.handler = handler
        self.pair = pair
        self.trust = trust
        self.domain = f"meshkit-{next(_domains)}".encode()
        self.refused: dict[str, int] = {UNTRUSTED: 0, HANDSHAKE: 0}
        self.admitted = 0
        self._lock = threading.Lock()  # the ZAP thread and the loop both count refusals
        self._on_refused = on_refused
        self._throttle = LogThrottle(log, settings.log_repeat_interval)
        self._sock = sock
        self._monitor = sock.get_monitor_socket(_FAILED)
        self._monitor_pump = SocketPump(self._monitor, self._on_event)
        self._monitor_pump.start()
        handler.doors[self.domain] = self

    @property
    def public_key(self) -> str:
        """The server's public key (Z85), for its registry record."""
        return self.pair.public_text

    def decide(self, mechanism: bytes, credentials: list[bytes], address: bytes) -> tuple[bytes, bytes, bytes]:
        """(status, status text, User-Id) for one handshake."""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refuse(HANDSHAKE, address, "not a CURVE handshake")
            return b"400", b"CURVE required", b""
        key = z85.encode(credentials[0]).decode()
        service = self.trust.service_of(key)
        if service is None:
            self._refuse(UNTRUSTED, address, f"key {key[:8]}... is not trusted")
            return b"400", b"key not trusted", b""
        with self._lock:
            self.admitted += 1
        return b"200", b"OK", service.encode()

    def _refuse(self, reason: str, address: bytes, why: str) -> None:
        with self._lock:
            self.refused[reason] += 1
            try:
                self._on_refused(reason)
            except Exception:  # a failing metric must not stop admissions
                log.exception("refusal callback failed")
            self._throttle.log(reason, logging.WARNING, "refused a connection from %s: %s",
                               clip(address.decode(errors="replace")), why, extra={"refused": self.refused[reason]})

    def _on_event(self, frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        # ZAP refusals also end in HANDSHAKE_FAILED_AUTH; they were counted as untrusted already.
        if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            endpoint = event.get("endpoint", b"")
            self._refuse(HANDSHAKE, endpoint if isinstance(endpoint, bytes) else b"",
                         f"handshake failed (error {event['value']})")

    def close(self) -> None:
        """Stop counting and leave the handler (call before the server socket closes)."""
        self._monitor_pump.stop()
        if not self._sock.closed:
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self.handler.leave(self.domain)


class ZapHandler:
    """Answers the ZAP requests of one context, in a thread of its own, by asking each request's door."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.ctx = ctx
        self.doors: dict[bytes, Door] = {}  # written by the loop, read by the thread (one dict operation each)
        sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)  # here, so that a server binding right after is already covered
        wake = f"inproc://meshkit-zap-stop-{id(self)}"
        self._stop_rx: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self._stop_rx.bind(wake)
        self._stop_tx: zmq.Socket[bytes] = ctx.socket(zmq.PAIR)
        self._stop_tx.connect(wake)
        self.sock = sock
        # The sockets above move to the thread (Thread.start is a full barrier), except _stop_tx.
        self._thread = threading.Thread(target=self._serve, name="meshkit-zap", daemon=True)
        self._thread.start()

    def leave(self, domain: bytes) -> None:
        """Forget ``domain``; the last door out stops the thread (and frees the ZAP endpoint)."""
        self.doors.pop(domain, None)
        if self.doors:
            return
        if _handlers.get(self.ctx) is self:
            del _handlers[self.ctx]
        self._stop_tx.send(b"")
        self._thread.join(5.0)
        self._stop_tx.close(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._stop_rx, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_rx in ready:
                    return
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = self._answer(frames)
                    if reply is not None:
                        self.sock.send_multipart(reply)
        except Exception:  # a dead handler would stall every handshake: say so loudly
            log.exception("ZAP handler stopped; new connections to this process cannot complete")
        finally:
            try:
                self.sock.unbind(ZAP_ENDPOINT)  # at once, so a new handler of this context can bind it
            except zmq.ZMQError:
                pass
            self.sock.close(linger=0)
            self._stop_rx.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        # ROUTER framing: [routing id, empty, version, request id, domain, address,
        #                  identity, mechanism, credentials...]; only libzmq can reach inproc.
        if len(frames) < 8 or frames[1]:
            log.warning("malformed ZAP request of %d frames dropped", len(frames))
            return None
        routing, _, version, request_id, domain, address, _identity, mechanism = frames[:8]
        door = self.doors.get(domain)
        if version != ZAP_VERSION:
            status, text, user = b"500", b"unsupported ZAP version", b""
        elif door is None:
            status, text, user = b"400", b"unknown domain", b""
        else:
            status, text, user = door.decide(mechanism, frames[8:], address)
        return [routing, b"", ZAP_VERSION, request_id, status, text, user, b""]


def handler_for(ctx: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler:
    """The context's ZAP handler, started if none is."""
    handler = _handlers.get(ctx)
    if handler is None:
        handler = _handlers[ctx] = ZapHandler(ctx)
    return handler


def apply_server(sock: zmq.Socket[bytes], settings: Settings, ctx: zmq.Context[zmq.Socket[bytes]],
                 on_refused: Callable[[str], None]) -> Door | None:
    """Make ``sock`` (before it binds) a CURVE server admitting trusted keys; ``None`` if CURVE is off.

    Raises :class:`~meshkit.errors.ConfigError` if the keypair or the key
    directory is missing or too open, and then closes ``sock`` (it could only
    serve without CURVE; an open socket would also keep its context from
    terminating). Close the returned door before the socket.
    """
    if not curve.enabled(settings):
        return None
    try:
        pair = curve.load_keypair(settings)
        trust = curve.TrustStore.from_settings(settings)
    except ConfigError:
        sock.close(linger=0)
        raise
    for problem in trust.problems:
        log.warning("key directory: %s", problem)
    door = Door(handler_for(ctx), sock, pair, trust, settings, on_refused)
    sock.curve_server = True
    sock.curve_secretkey = pair.secret
    sock.curve_publickey = pair.public
    sock.zap_domain = door.domain
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        try:
            sock.setsockopt(enforce, 1)
        except zmq.ZMQError:
            pass  # a libzmq without the draft option: the handler is bound before the socket, see module doc
    return door
