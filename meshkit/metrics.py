"""Statsd metrics for one process: what the framework reports, each figure under its own name.

:class:`Metrics` is a :class:`meshkit.statsd.Statsd` (aggregated in process,
sent once per flush interval, never blocking or raising into the caller;
disabled with an empty address) plus one method per figure the framework
reports: calls served and made, retries, ejections, publishes, pushes, the
gateway's clients and messages, flapping watchers, resources, registry
errors. Every name is ``<prefix>.<service>.<name>``; the parts that come from
traffic (method names, topics, error codes, reasons) pass through
:func:`sanitize`. Metric names and types are listed in ``docs/metrics.md``.
"""

from __future__ import annotations

from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .statsd import CACHE_LIMIT, Statsd, sanitize

__all__ = ["Metrics", "sanitize"]


class Metrics(Statsd):
    """Statsd metrics for one service process (construction, threading and flushing: :class:`Statsd`)."""

    @classmethod
    def from_settings(cls, settings: Settings, service: str, clock: Clock = SYSTEM_CLOCK) -> Metrics:
        """Metrics for ``service`` from its settings (per-service overrides applied)."""
        own = settings.for_service(service)
        return cls(own.statsd_address, own.statsd_prefix, service,
                   flush_interval=own.statsd_flush_interval, max_names=own.statsd_max_names, clock=clock)

    # -- what the framework reports ---------------------------------------------

    def call_served(self, method: str, ms: float, error_code: str | None) -> None:
        """One call served: ``rpc.<method>.calls``, ``.latency``, errors by code."""
        if self._client is None:
            return
        pair = self._served.get(method)
        if pair is None:
            pair = self._served_names(method)
        errors = () if error_code is None else (self.name("rpc", method, "errors", error_code),
                                                self.name("errors", error_code))
        self._handled(*pair, ms, errors)

    def _handled(self, count: str, latency: str, ms: float, errors: tuple[str, ...]) -> None:
        """One call or push taken care of: counted, timed, and each of ``errors`` counted once."""
        with self._lock:
            tally = self._tally
            tally.count(count, 1)
            tally.time(latency, ms)
            for name in errors:
                tally.count(name, 1)
        self._recorded()

    def _served_names(self, method: str) -> tuple[str, str]:
        # One lookup per served call instead of two; bounded like the other caches.
        if len(self._served) >= CACHE_LIMIT:
            self._served.clear()
        pair = self._served[method] = (self.name("rpc", method, "calls"), self.name("rpc", method, "latency"))
        return pair

    def call_made(self, service: str, method: str, ms: float, error_code: str | None) -> None:
        """One call made: ``client.<service>.<method>.calls``, ``.latency``, ``.errors.<code>``."""
        if self._client is None:
            return
        errors = () if error_code is None else (self.name("client", service, method, "errors", error_code),)
        self._handled(self.name("client", service, method, "calls"),
                      self.name("client", service, method, "latency"), ms, errors)

    def call_retried(self, service: str, reason: str, allowed: bool) -> None:
        """A retry of a call to ``service`` after ``reason``: ``client.<service>.retries.<reason>``
        if the retry budget allowed it, else ``client.<service>.retries_refused.<reason>``."""
        self._count(("client", service, "retries" if allowed else "retries_refused", reason))

    def instance_ejected(self, service: str, ejected_now: int) -> None:
        """An instance of ``service`` was ejected: ``client.<service>.ejections`` counts it and
        the gauge ``client.<service>.ejected`` is how many are ejected now."""
        self._count(("client", service, "ejections"))
        self._gauge(("client", service, "ejected"), ejected_now)

    def inflight(self, n: int) -> None:
        """Gauge ``inflight``: calls and pushes being served right now."""
        self._gauge(("inflight",), n)

    def published(self, topic: str, subscribers: int, delivered: int) -> None:
        """One publish of ``topic``: to ``subscribers`` instances, ``delivered`` of them took it."""
        if self._client is None:
            return
        sent = self.name("publish", topic, "sent")
        took = self.name("publish", topic, "delivered")
        missed = self.name("publish", topic, "undelivered")
        with self._lock:
            tally = self._tally
            tally.count(sent, 1)
            tally.count(took, delivered)
            tally.count(missed, max(0, subscribers - delivered))
        self._recorded()

    def push_received(self, topic: str, ms: float, error_code: str | None) -> None:
        """One push of ``topic`` handled: ``push.<topic>.received``, ``.latency``, errors."""
        if self._client is None:
            return
        errors = () if error_code is None else (self.name("push", topic, "errors", error_code),
                                                self.name("errors", error_code))
        self._handled(self.name("push", topic, "received"), self.name("push", topic, "latency"), ms, errors)

    def gateway_clients(self, n: int) -> None:
        """Gauge ``gateway.clients``: client connections this gateway holds."""
        self._gauge(("gateway", "clients"), n)

    def gateway_message(self, direction: str) -> None:
        """Count one gateway client message; ``direction`` is ``"in"`` or ``"out"``."""
        self._count(("gateway", "messages", direction))

    def gateway_rejected(self, reason: str) -> None:
        """Count one client message or connection the gateway refused, by ``reason``."""
        self._count(("gateway", "rejected", reason))

    def flap_stopped(self, watcher: str) -> None:
        """Count a Circus watcher stopped for restarting too often."""
        self._count(("flap", "stopped", watcher))

    def resource_used(self, resource: str, units: int) -> None:
        """Count ``units`` of a named resource spent by a call: ``resource.<name>.used`` (docs/limits.md)."""
        self._count(("resource", resource, "used"), units)

    def resource_event(self, resource: str, event: str) -> None:
        """Count one ``waited``, ``exhausted``, ``lease`` or ``lease_error``: ``resource.<name>.<event>``."""
        self._count(("resource", resource, event))

    def registry_error(self) -> None:
        """Count one failed registry operation (Redis unreachable, timeout, ...)."""
        self._count(("registry", "errors"))

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Metrics {self._base.rstrip('.')} {state}>"
