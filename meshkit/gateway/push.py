"""Pushing to one client connection, from any backend, wherever its gateway runs.

A connection id is ``<gateway instance id>-<counter>`` (hex), so it names
the gateway instance that holds it. :func:`push_to_connection` reads that
instance from the id and sends it one mesh PUSH on topic
:data:`DELIVER_TOPIC`, straight to its router: no Redis round trip, no
broadcast. The gateway writes the message to that connection alone, in the
listener's dialect, as a notification ``{"method": method, "params": params}``,
and may first add topic subscriptions to the connection (``subscribe``:
what a Stratum pool needs, since its clients never send ``mesh.subscribe``).

Outcome: ``True`` once the gateway has accepted the line into its ordered
push queue (:mod:`.fanout`; a full queue raises ``overloaded``);
``False`` when the connection is not open (closed, never existed, or its
gateway is gone); the gateway answers that with
:class:`~meshkit.errors.UnknownConnectionError` and logs nothing above
debug. A timeout or a gateway lost mid-push raises (the outcome is unknown).

Order: the PUSH goes through the sender's one connection to that gateway,
the same one its :meth:`~meshkit.Service.publish` pushes take, and the
gateway handles one sender's pushes one after another, in arrival order,
and writes topic pushes and deliveries through one ordered queue. So a
topic push and a per-connection push from one process reach the client in
the order they were sent.

The payload (``Delivery``) is ``{"conn": id, "method": str | None, "params":
any, "subscribe": [topics]}``; anything else is refused with
:class:`~meshkit.errors.RefusedError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import NoInstanceError, RefusedError, UnknownConnectionError
from ..untrusted import clip
from . import jsonrpc
from .dialect import Dialect
from .jsonrpc import RpcError
from .options import GatewayOptions
from .subscriptions import subscribe as add_subscriptions

DELIVER_TOPIC = "gateway.deliver"
_MAX_TOPICS = 64


class Target(Protocol):
    """What :func:`deliver` needs of a connection."""

    closed: bool
    subscriptions: set[str]

    def send(self, line: bytes) -> bool: ...


class Pusher(Protocol):
    """What can push to one instance: a :class:`~meshkit.Service` or an :class:`~meshkit.AsyncClient`."""

    async def push_to(self, instance_id: str, topic: str, payload: Any, *,
                      timeout: float | None = None) -> None: ...


def gateway_of(conn_id: str) -> str:
    """The gateway instance id inside connection id ``conn_id`` (``""`` if it has none)."""
    instance, dash, counter = conn_id.rpartition("-")
    return instance if dash and instance and counter else ""


@dataclass(frozen=True)
class Delivery:
    """One message for one connection (the payload of a :data:`DELIVER_TOPIC` push)."""

    conn: str
    method: str | None = None
    params: Any = None
    subscribe: tuple[str, ...] = ()

    def payload(self) -> dict[str, Any]:
        return {"conn": self.conn, "method": self.method, "params": self.params,
                "subscribe": list(self.subscribe)}

    @classmethod
    def from_payload(cls, payload: Any) -> Delivery:
        """Validate a received payload; ``ValueError`` saying what is wrong."""
        if not isinstance(payload, Mapping):
            raise ValueError("a delivery is a map")
        conn, method = payload.get("conn"), payload.get("method")
        topics = payload.get("subscribe") or []
        if not isinstance(conn, str) or not conn:
            raise ValueError("conn must be a non-empty string")
        if method is not None and (not isinstance(method, str) or not method):
            raise ValueError("method must be a non-empty string or null")
        if (not isinstance(topics, (list, tuple)) or len(topics) > _MAX_TOPICS
                or not all(isinstance(t, str) and t for t in topics)):
            raise ValueError(f"subscribe must be a list of at most {_MAX_TOPICS} topics")
        return cls(conn, method, payload.get("params"), tuple(topics))


async def push_to_connection(sender: Pusher, conn_id: str, method: str | None, params: Any = None, *,
                             subscribe: Iterable[str] = (), timeout: float | None = None) -> bool:
    """Send ``method(params)`` to connection ``conn_id`` (see the module doc); whether it got there.

    ``method`` None sends nothing but still applies ``subscribe``. Raises
    :class:`~meshkit.errors.RefusedError` for topics the gateway does not
    forward, and :class:`~meshkit.errors.CallTimeoutError` or
    :class:`~meshkit.errors.LostPeerError` when the outcome is unknown.
    """
    instance = gateway_of(conn_id)
    if not instance:
        return False
    delivery = Delivery(conn_id, method, params, tuple(subscribe))
    try:
        await sender.push_to(instance, DELIVER_TOPIC, delivery.payload(), timeout=timeout)
    except (UnknownConnectionError, NoInstanceError):
        return False
    return True


def deliver(payload: Any, connections: Mapping[str, Target], options: GatewayOptions,
            dialect: Dialect, gateway_id: str) -> None:
    """Hand one received delivery to its connection at once (:func:`prepare`, then send).

    Raises only :class:`RefusedError`, as :func:`prepare` does, and
    ``unknown_connection`` if the connection closed as the line was written.
    """
    prepared = prepare(payload, connections, options, dialect, gateway_id)
    if prepared is not None and not prepared[0].send(prepared[1]):
        raise UnknownConnectionError(f"connection {clip(str(payload.get('conn')))!r} closed")


def prepare(payload: Any, connections: Mapping[str, Target], options: GatewayOptions,
            dialect: Dialect, gateway_id: str) -> tuple[Target, bytes] | None:
    """The gateway's side: check one received delivery, apply its ``subscribe``; the line to send.

    Returns the connection and the line for it (None when ``method`` is None:
    nothing to send). The gateway queues that line behind the pushes it has
    already accepted (:mod:`.fanout`), so the sender's ack means "queued".
    Raises only :class:`RefusedError`, which the server answers to the
    sender with no log above debug: ``unknown_connection`` for a connection
    that is not open here, ``refused`` for a payload that is not a delivery,
    cannot be sent as JSON, or asks for topics the gateway does not forward.
    """
    try:
        delivery = Delivery.from_payload(payload)
    except ValueError as exc:
        raise RefusedError(f"not a delivery: {clip(str(exc))}") from None
    conn = connections.get(delivery.conn)
    if conn is None or conn.closed:
        raise UnknownConnectionError(f"no open connection {clip(delivery.conn)!r} on gateway {gateway_id}")
    if delivery.subscribe:
        try:
            add_subscriptions(conn.subscriptions, list(delivery.subscribe), options.topics,
                              options.max_subscriptions)
        except RpcError as exc:
            raise RefusedError(exc.message) from None
    if delivery.method is None:
        return None
    try:
        line = dialect.notification_line(delivery.method, delivery.params)
    except jsonrpc.UNENCODABLE as exc:
        raise RefusedError(f"cannot be sent as JSON: {clip(str(exc))}") from None
    return conn, line
