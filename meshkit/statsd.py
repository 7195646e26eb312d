"""The statsd core of :class:`meshkit.metrics.Metrics`: gathered in process, sent once per flush interval.

A :class:`Statsd` sends to one statsd address over UDP. Every name is
``<prefix>.<service>.<name>``; the parts that come from traffic (method
names, topics, error codes, reasons) pass through :func:`sanitize`, so a
strange method name cannot break the statsd line format or the name
hierarchy. With an empty address every method returns at once and no socket
exists: disabled metrics cost one attribute test per call.

Figures are not sent per call: a call adds to a :class:`meshkit.tally.Tally`
(counters summed, gauges last value, timers a bounded uniform sample sent as
``|ms`` lines with a sample rate) and :meth:`Statsd.flush` sends it every
``flush_interval`` seconds, from a timer on the event loop the figures were
recorded on, and once more at :meth:`Statsd.close`, so nothing counted is
lost by aggregating. A flush packs the lines into datagrams of at most 512
bytes. Per call this costs a few dictionary updates instead of a datagram.
The tally holds at most ``max_names`` distinct names per interval; figures
for names past that are counted in :attr:`Statsd.names_dropped` and sent as
the counter ``metrics.names_dropped``.

Sending never blocks and never raises into the caller. The socket is
non-blocking and connected, so a full send buffer and a refused port (the
ICMP error the kernel reports on the next send) both surface as errors, which
are swallowed and counted in :attr:`Statsd.dropped`.

Built names are cached (per-RPC calls would otherwise rebuild and sanitise
the same strings every time); the cache is bounded so that a flood of
distinct names cannot grow it without limit. What the framework itself
reports, by name, is :mod:`meshkit.metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading

from .clock import SYSTEM_CLOCK, Clock, TimerHandle
from .datagrams import UdpSender, pack, parse_address
from .errors import ConfigError
from .tally import Tally

__all__ = ["Statsd", "sanitize"]

_log = logging.getLogger("meshkit.metrics")  # the name operators filter on, from before the split

_UNSAFE_PART = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")  # dotted names given by code, not traffic
CACHE_LIMIT = 2048  # entries per name cache (here and in meshkit.metrics)
# 512 bytes always fits one datagram on any path; flushed lines are split at it.
_MAX_UDP_SIZE = 512
# Values kept per timer per interval: enough for the server's p99 to mean something.
_TIMER_SAMPLES = 128


def sanitize(part: str) -> str:
    """``part`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

    The result is never empty (``""`` becomes ``"_"``), so it is always a
    valid single component of a dotted metric name.
    """
    return _UNSAFE_PART.sub("_", part) or "_"


def _sanitize_dotted(name: str) -> str:
    return ".".join(p or "_" for p in _UNSAFE_NAME.sub("_", name).split("."))


class Statsd:
    """Statsd figures for one process, aggregated and flushed (the core of :class:`meshkit.metrics.Metrics`).

    ``address`` is ``host:port`` (``[::1]:8125`` for IPv6) or ``""`` to
    disable metrics. A malformed address, a ``flush_interval`` that is not a
    positive number of seconds or a ``max_names`` below 1 raises
    :class:`ConfigError`; an address that cannot be resolved or reached at
    construction logs a warning and disables metrics instead, because metrics
    must never stop a service from serving. After :meth:`close` every method
    is a no-op.

    Safe to call from the event loop and from handler threads alike: figures
    are recorded under a lock, and a figure recorded off the loop arms the
    flush timer through ``call_soon_threadsafe``. Figures recorded where no
    event loop was ever seen are flushed by the first record after the
    interval has passed, and at :meth:`close`.
    """

    def __init__(self, address: str, prefix: str, service: str, *, flush_interval: float = 1.0,
                 max_names: int = 1000, clock: Clock = SYSTEM_CLOCK) -> None:
        if not isinstance(flush_interval, (int, float)) or not math.isfinite(flush_interval) \
                or flush_interval <= 0:
            raise ConfigError(f"statsd_flush_interval must be a positive number of seconds, "
                              f"got {flush_interval!r}")
        if type(max_names) is not int or max_names < 1:
            raise ConfigError(f"statsd_max_names must be an integer of at least 1, got {max_names!r}")
        head = [_sanitize_dotted(prefix)] if prefix else []
        self._base = ".".join([*head, sanitize(service)]) + "."
        self._names: dict[tuple[str, ...], str] = {}
        self._dotted_names: dict[str, str] = {}
        self._served: dict[str, tuple[str, str]] = {}
        self._client: UdpSender | None = None
        self._dropped_at_close = 0
        self.flush_interval = float(flush_interval)
        self._max_names = max_names
        self._clock = clock
        self._lock = threading.Lock()
        self._tally = Tally(max_names, _TIMER_SAMPLES)
        self._names_dropped = 0
        self._armed = False  # a flush is scheduled (or being scheduled) for what the tally holds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: TimerHandle | None = None
        self._due = clock.now() + self.flush_interval  # for figures recorded with no loop
        if not address:
            return
        host, port, ipv6 = parse_address(address)
        try:
            self._client = UdpSender(host, port, ipv6)
        except OSError as exc:
            _log.warning(
                "statsd address %s unusable, metrics disabled: %s",
                address,
                exc,
                extra={"statsd_address": address},
            )

    @property
    def enabled(self) -> bool:
        """Whether metrics are being sent (an address was given and it is not closed)."""
        return self._client is not None

    @property
    def dropped(self) -> int:
        """How many datagrams could not be sent (refused, buffer full, ...)."""
        client = self._client
        return self._dropped_at_close if client is None else client.dropped

    @property
    def names_dropped(self) -> int:
        """How many figures were not kept because the tally already held ``max_names`` names."""
        return self._names_dropped + self._tally.names_dropped

    def name(self, *parts: str) -> str:
        """The full metric name for ``parts``, each sanitised (``rpc``, method, ``calls``)."""
        full = self._names.get(parts)
        if full is None:
            if len(self._names) >= CACHE_LIMIT:
                self._names.clear()
            full = self._base + ".".join(sanitize(p) for p in parts)
            self._names[parts] = full
        return full

    def _dotted(self, name: str) -> str:
        # Names given by code may be dotted on purpose, so the dots are kept.
        full = self._dotted_names.get(name)
        if full is None:
            if len(self._dotted_names) >= CACHE_LIMIT:
                self._dotted_names.clear()
            full = self._base + _sanitize_dotted(name)
            self._dotted_names[name] = full
        return full

    # -- flushing ------------------------------------------------------------------

    def _recorded(self) -> None:
        """After a record: make sure a flush will come (called outside the lock)."""
        if self._armed:
            if self._clock.now() < self._due + self.flush_interval:
                return
            # The timer is a whole interval late: its loop stopped or closed. Flush
            # from here, and let the next figure arm a timer wherever it is recorded.
            self._armed = False
            self._timer = None
            self.flush()
            return
        loop: asyncio.AbstractEventLoop | None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = self._loop
            if loop is None or loop.is_closed():
                if self._clock.now() >= self._due:
                    self.flush()
                return
            self._armed = True
            self._due = self._clock.now() + self.flush_interval
            try:
                loop.call_soon_threadsafe(self._arm_on_loop)
            except RuntimeError:  # the loop closed in between: flush here instead
                self._armed = False
                self.flush()
            return
        self._loop = loop
        self._armed = True
        self._due = self._clock.now() + self.flush_interval
        self._timer = self._clock.call_later(self.flush_interval, self._on_timer)

    def _arm_on_loop(self) -> None:
        if self._client is not None:
            self._timer = self._clock.call_later(self.flush_interval, self._on_timer)
        else:
            self._armed = False

    def _on_timer(self) -> None:
        self._timer = None
        self._armed = False
        self.flush()

    def flush(self) -> None:
        """Send everything recorded since the last flush now (a no-op when there is nothing)."""
        client = self._client
        with self._lock:
            tally = self._tally
            if not len(tally) and not tally.names_dropped:
                return
            self._tally = Tally(self._max_names, _TIMER_SAMPLES)
            self._due = self._clock.now() + self.flush_interval
        lines = tally.lines()
        if tally.names_dropped:
            self._names_dropped += tally.names_dropped
            lines.append(f"{self._base}metrics.names_dropped:{tally.names_dropped}|c")
        if client is not None:
            for datagram in pack(lines, _MAX_UDP_SIZE):
                client.send(datagram)

    def close(self) -> None:
        """Flush what is held, close the socket; later calls do nothing. Safe to call twice."""
        timer, self._timer = self._timer, None
        if timer is not None:
            try:
                timer.cancel()
            except RuntimeError:  # the timer's loop is gone; it will never run anyway
                pass
        self.flush()
        client, self._client = self._client, None
        if client is not None:
            self._dropped_at_close = client.dropped
            client.close()

    # -- plain statsd operations -------------------------------------------------

    def incr(self, name: str, count: int = 1) -> None:
        """Add ``count`` to counter ``name`` (dotted, relative to the service prefix)."""
        if self._client is not None:
            self._add(self._dotted(name), count)

    def timing(self, name: str, ms: float) -> None:
        """Record a duration of ``ms`` milliseconds in timer ``name``."""
        if self._client is not None:
            full = self._dotted(name)
            with self._lock:
                self._tally.time(full, ms)
            self._recorded()

    def gauge(self, name: str, value: float) -> None:
        """Set gauge ``name`` to ``value`` (the last value set in an interval is sent)."""
        if self._client is not None:
            self._set(self._dotted(name), value)

    def gauge_delta(self, name: str, delta: float) -> None:
        """Move gauge ``name`` by ``delta`` (positive or negative; an interval's deltas are summed)."""
        if self._client is not None:
            self._set(self._dotted(name), delta, delta=True)

    def _count(self, parts: tuple[str, ...], count: int = 1) -> None:
        """Add ``count`` to the counter named by ``parts`` (each sanitised: see :meth:`name`)."""
        if self._client is not None:
            self._add(self.name(*parts), count)

    def _gauge(self, parts: tuple[str, ...], value: float) -> None:
        """Set the gauge named by ``parts`` (each sanitised: see :meth:`name`)."""
        if self._client is not None:
            self._set(self.name(*parts), value)

    def _add(self, full: str, count: int) -> None:
        with self._lock:
            self._tally.count(full, count)
        self._recorded()

    def _set(self, full: str, value: float, *, delta: bool = False) -> None:
        with self._lock:
            self._tally.gauge(full, value, delta=delta)
        self._recorded()
