"""Statsd metrics for one process: fire-and-forget UDP that never blocks or raises.

A :class:`Metrics` sends to one statsd address through the ``statsd`` package.
Every name is ``<prefix>.<service>.<name>``; the parts that come from traffic
(method names, topics, error codes, reasons) pass through :func:`sanitize`,
so a strange method name cannot break the statsd line format or the name
hierarchy. With an empty address every method returns at once and no socket
exists: disabled metrics cost one attribute test per call.

Sending never blocks and never raises into the caller. The socket is
non-blocking and connected, so a full send buffer and a refused port (the
ICMP error the kernel reports on the next send) both surface as errors, which
are swallowed and counted in :attr:`Metrics.dropped`.

Built names are cached (per-RPC calls would otherwise rebuild and sanitise
the same strings every time); the cache is bounded so that a flood of
distinct names cannot grow it without limit. Metric names and types are
listed in ``docs/metrics.md``.
"""

from __future__ import annotations

import logging
import re

import statsd

from .config import Settings
from .errors import ConfigError

__all__ = ["Metrics", "sanitize"]

_log = logging.getLogger(__name__)

_UNSAFE_PART = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")  # dotted names given by code, not traffic
_CACHE_LIMIT = 2048
# 512 bytes always fits one datagram on any path; batched lines are split at it.
_MAX_UDP_SIZE = 512


def sanitize(part: str) -> str:
    """``part`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

    The result is never empty (``""`` becomes ``"_"``), so it is always a
    valid single component of a dotted metric name.
    """
    return _UNSAFE_PART.sub("_", part) or "_"


def _sanitize_dotted(name: str) -> str:
    return ".".join(p or "_" for p in _UNSAFE_NAME.sub("_", name).split("."))


def _parse_address(address: str) -> tuple[str, int, bool]:
    """``host:port`` or ``[v6addr]:port`` as (host, port, ipv6)."""
    host, sep, port_text = address.rpartition(":")
    ipv6 = host.startswith("[") and host.endswith("]")
    if ipv6:
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"statsd_address must be host:port, got {address!r}")
    return host, int(port_text), ipv6


class _UdpClient(statsd.StatsClient):  # type: ignore[misc]  # statsd ships no type hints
    """A ``StatsClient`` whose socket is non-blocking and connected, counting lost sends."""

    def __init__(self, host: str, port: int, ipv6: bool) -> None:
        super().__init__(host, port, prefix=None, maxudpsize=_MAX_UDP_SIZE, ipv6=ipv6)
        self.dropped = 0
        try:
            # Non-blocking: a full buffer must cost a lost metric, not a stalled handler.
            # Connected: the kernel skips a route lookup per send, and reports a
            # refused port instead of dropping silently, so losses can be counted.
            self._sock.setblocking(False)
            self._sock.connect(self._addr)
        except OSError:
            self._sock.close()
            raise

    def _send(self, data: str) -> None:
        try:
            self._sock.send(data.encode("ascii"))
        except (OSError, ValueError, AttributeError):
            # AttributeError: a send racing close() from another thread finds no socket.
            self.dropped += 1


class Metrics:
    """Statsd metrics for one service process.

    ``address`` is ``host:port`` (``[::1]:8125`` for IPv6) or ``""`` to
    disable metrics. A malformed address raises :class:`ConfigError`; an
    address that cannot be resolved or reached at construction logs a warning
    and disables metrics instead, because metrics must never stop a service
    from serving. After :meth:`close` every method is a no-op.

    Safe to call from the event loop and from handler threads alike.
    """

    def __init__(self, address: str, prefix: str, service: str) -> None:
        head = [_sanitize_dotted(prefix)] if prefix else []
        self._base = ".".join([*head, sanitize(service)]) + "."
        self._names: dict[tuple[str, ...], str] = {}
        self._dotted_names: dict[str, str] = {}
        self._client: _UdpClient | None = None
        self._dropped_at_close = 0
        if not address:
            return
        host, port, ipv6 = _parse_address(address)
        try:
            self._client = _UdpClient(host, port, ipv6)
        except OSError as exc:
            _log.warning(
                "statsd address %s unusable, metrics disabled: %s",
                address,
                exc,
                extra={"statsd_address": address},
            )

    @classmethod
    def from_settings(cls, settings: Settings, service: str) -> Metrics:
        """Metrics for ``service`` from its settings (per-service overrides applied)."""
        own = settings.for_service(service)
        return cls(own.statsd_address, own.statsd_prefix, service)

    @property
    def enabled(self) -> bool:
        """Whether metrics are being sent (an address was given and it is not closed)."""
        return self._client is not None

    @property
    def dropped(self) -> int:
        """How many datagrams could not be sent (refused, buffer full, ...)."""
        client = self._client
        return self._dropped_at_close if client is None else client.dropped

    def name(self, *parts: str) -> str:
        """The full metric name for ``parts``, each sanitised (``rpc``, method, ``calls``)."""
        full = self._names.get(parts)
        if full is None:
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            full = self._base + ".".join(sanitize(p) for p in parts)
            self._names[parts] = full
        return full

    def _dotted(self, name: str) -> str:
        # Names given by code may be dotted on purpose, so the dots are kept.
        full = self._dotted_names.get(name)
        if full is None:
            if len(self._dotted_names) >= _CACHE_LIMIT:
                self._dotted_names.clear()
            full = self._base + _sanitize_dotted(name)
            self._dotted_names[name] = full
        return full

    # -- plain statsd operations -------------------------------------------------

    def incr(self, name: str, count: int = 1) -> None:
        """Add ``count`` to counter ``name`` (dotted, relative to the service prefix)."""
        client = self._client
        if client is not None:
            client.incr(self._dotted(name), count)

    def timing(self, name: str, ms: float) -> None:
        """Record a duration of ``ms`` milliseconds in timer ``name``."""
        client = self._client
        if client is not None:
            client.timing(self._dotted(name), ms)

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name`` to ``value``."""
        client = self._client
        if client is not None:
            client.gauge(self._dotted(name), value)

    def gauge_delta(self, name: str, delta: float) -> None:
        """Move gauge ``name`` by ``delta`` (positive or negative)."""
        client = self._client
        if client is not None:
            client.gauge(self._dotted(name), delta, delta=True)

    def close(self) -> None:
        """Close the socket; later calls do nothing. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            self._dropped_at_close = client.dropped
            client.close()

    # -- what the framework reports ---------------------------------------------

    def call_served(self, method: str, ms: float, error_code: str | None) -> None:
        """One call served: ``rpc.<method>.calls``, ``.latency``, errors by code."""
        client = self._client
        if client is None:
            return
        with client.pipeline() as pipe:
            pipe.incr(self.name("rpc", method, "calls"))
            pipe.timing(self.name("rpc", method, "latency"), ms)
            if error_code is not None:
                pipe.incr(self.name("rpc", method, "errors", error_code))
                pipe.incr(self.name("errors", error_code))

    def call_made(self, service: str, method: str, ms: float, error_code: str | None) -> None:
        """One call made: ``client.<service>.<method>.calls``, ``.latency``, ``.errors.<code>``."""
        client = self._client
        if client is None:
            return
        with client.pipeline() as pipe:
            pipe.incr(self.name("client", service, method, "calls"))
            pipe.timing(self.name("client", service, method, "latency"), ms)
            if error_code is not None:
                pipe.incr(self.name("client", service, method, "errors", error_code))

    def inflight(self, n: int) -> None:
        """Gauge ``inflight``: calls and pushes being served right now."""
        client = self._client
        if client is not None:
            client.gauge(self.name("inflight"), n)

    def published(self, topic: str, subscribers: int, delivered: int) -> None:
        """One publish of ``topic``: to ``subscribers`` instances, ``delivered`` of them took it."""
        client = self._client
        if client is None:
            return
        with client.pipeline() as pipe:
            pipe.incr(self.name("publish", topic, "sent"))
            pipe.incr(self.name("publish", topic, "delivered"), delivered)
            pipe.incr(self.name("publish", topic, "undelivered"), max(0, subscribers - delivered))

    def push_received(self, topic: str, ms: float, error_code: str | None) -> None:
        """One push of ``topic`` handled: ``push.<topic>.received``, ``.latency``, errors."""
        client = self._client
        if client is None:
            return
        with client.pipeline() as pipe:
            pipe.incr(self.name("push", topic, "received"))
            pipe.timing(self.name("push", topic, "latency"), ms)
            if error_code is not None:
                pipe.incr(self.name("push", topic, "errors", error_code))
                pipe.incr(self.name("errors", error_code))

    def gateway_clients(self, n: int) -> None:
        """Gauge ``gateway.clients``: client connections this gateway holds."""
        client = self._client
        if client is not None:
            client.gauge(self.name("gateway", "clients"), n)

    def gateway_message(self, direction: str) -> None:
        """Count one gateway client message; ``direction`` is ``"in"`` or ``"out"``."""
        client = self._client
        if client is not None:
            client.incr(self.name("gateway", "messages", direction))

    def gateway_rejected(self, reason: str) -> None:
        """Count one client message or connection the gateway refused, by ``reason``."""
        client = self._client
        if client is not None:
            client.incr(self.name("gateway", "rejected", reason))

    def flap_stopped(self, watcher: str) -> None:
        """Count a Circus watcher stopped for restarting too often."""
        client = self._client
        if client is not None:
            client.incr(self.name("flap", "stopped", watcher))

    def resource_used(self, resource: str, units: int) -> None:
        """Count ``units`` of a named resource spent by a call: ``resource.<name>.used`` (docs/limits.md)."""
        client = self._client
        if client is not None:
            client.incr(self.name("resource", resource, "used"), units)

    def resource_event(self, resource: str, event: str) -> None:
        """Count one ``waited``, ``exhausted``, ``lease`` or ``lease_error``: ``resource.<name>.<event>``."""
        client = self._client
        if client is not None:
            client.incr(self.name("resource", resource, event))

    def registry_error(self) -> None:
        """Count one failed registry operation (Redis unreachable, timeout, ...)."""
        client = self._client
        if client is not None:
            client.incr(self.name("registry", "errors"))

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Metrics {self._base.rstrip('.')} {state}>"
