"""The one object per instance that the server, the client and user spans report to.

:meth:`Observer.started` and :meth:`Observer.finished` bracket every call
and push served (the server calls them); :meth:`Observer.record` takes
client and user spans. From them it keeps, bounded: the
:class:`~.spans.SpanBuffer`, the per-method :class:`~.stats.Stats`, the
calls in flight, the open taps, and it writes the per-call log lines of
``docs/logging.md``: one ``call served`` line at DEBUG per call served (when
DEBUG is on, for everyone or for the call's metadata, see
:mod:`.logfilter`) and one ``call failed`` line at WARNING per failed call.

Cost per call, measured on ``bench/rpc.py``: see ``docs/observability.md``.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .. import wire
from ..errors import ProtocolError
from ..trace import TraceContext
from ..untrusted import clip
from .logfilter import LogRules
from .options import ObserveOptions
from .spans import BUCKET_BOUNDS_US, OK, SPAN_OVERHEAD, AttrValue, Row, Span, SpanBuffer, row_cost
from .stats import Counter, Stats
from .tap import TapSet

log = logging.getLogger("meshkit.calls")

MAX_CRASHES = 32  # periodic-task failures remembered


class Active:
    """A call or push being served."""

    __slots__ = ("counter", "identity", "meta", "name", "push", "start", "trace")

    def __init__(self, name: str, trace: TraceContext, meta: Mapping[str, str], identity: bytes,
                 push: bool, counter: Counter) -> None:
        self.name = name
        self.trace = trace
        self.meta = meta
        self.identity = identity
        self.push = push
        self.counter = counter
        self.start = time.perf_counter()

    @property
    def caller(self) -> str:
        """Who sent it, for people: the gateway client's address if any, else the connection's id."""
        client = self.meta.get("client")
        return str(client) if client else self.identity.hex()[:16]


class Observer:
    """What one instance knows about its own work (see the module doc)."""

    def __init__(self, service: str, instance: str, host: str, options: ObserveOptions | None = None,
                 rules: LogRules | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.instance = instance
        self.host = host
        self.options = options or ObserveOptions()
        o = self.options
        self.spans = SpanBuffer(o.span_buffer_count, o.span_buffer_bytes, o.spans_per_bucket, o.error_spans)
        self.stats = Stats()
        self.taps = TapSet(o.max_taps, o.hidden_keys, now)
        self.rules = rules or LogRules()
        self.active: set[Active] = set()
        # One clock read per call: wall time is the performance counter plus this offset.
        self._unix_offset = time.time() - time.perf_counter()
        self._spans_on = self.options.spans
        self.crashes: deque[dict[str, Any]] = deque(maxlen=MAX_CRASHES)
        self.exporter: Callable[[Span], None] | None = None

    def started(self, name: str, trace: TraceContext, meta: Mapping[str, str], identity: bytes,
                push: bool = False) -> Active:
        """A call (or push) began; hand the result to :meth:`finished`."""
        counter = self.stats.counter(push, name)
        counter.in_flight += 1
        active = Active(name, trace, meta, identity, push, counter)
        self.active.add(active)
        return active

    def finished(self, active: Active, code: str | None, frames: list[bytes] | None = None,
                 args: Any = None) -> None:
        """It ended with error ``code`` (``None``: ok); ``frames`` is the answer, read only on failure."""
        duration_us = int((time.perf_counter() - active.start) * 1_000_000)
        self.active.discard(active)
        # Inlined (counter.finish, bucket_of, row_cost): this runs for every call served.
        bucket = bisect_right(BUCKET_BOUNDS_US, duration_us) - 1  # durations are never negative
        counter = active.counter
        counter.calls += 1
        counter.in_flight -= 1
        counter.buckets[bucket] += 1
        message = ""
        if code is not None:
            message = _error_message(frames) if frames else ""
            counter.failed(code, message)
        status = code or OK
        trace = active.trace
        row: Row | None = None
        if self._spans_on and trace.sampled:
            attrs: dict[str, AttrValue] | None = {"error": message} if message else None
            row = (trace.trace_id, trace.span_id, trace.parent_id, self.service, self.instance, self.host,
                   active.name, "consumer" if active.push else "server",
                   int((active.start + self._unix_offset) * 1_000_000), duration_us, status, attrs,
                   row_cost(active.name, attrs) if attrs else SPAN_OVERHEAD + len(active.name))
            self.spans.add_row(row, bucket)
            if self.exporter is not None:
                self.exporter(Span.of(row))
        if self.taps.taps:
            self.taps.offer(self.service, active.name, active.meta, status, duration_us,
                            lambda: (Span.of(row) if row else self._span_of(active, duration_us, status)).to_dict(),
                            args)
        if code is not None or log.isEnabledFor(logging.DEBUG):
            self._log(active, duration_us, code, message)

    def record(self, span: Span) -> None:
        """Keep a finished span (a client or user span, or a server one from :meth:`finished`)."""
        self.spans.add(span)
        if self.exporter is not None:
            self.exporter(span)

    def span(self, trace: TraceContext, name: str, kind: str, start_unix: float, duration_s: float,
             status: str = OK, attrs: dict[str, Any] | None = None) -> None:
        """Record a span of this instance that ended now."""
        if self._spans_on and trace.sampled:
            self.add_span(trace, name, kind, int(start_unix * 1_000_000), int(duration_s * 1_000_000), status,
                          attrs)

    def add_span(self, trace: TraceContext, name: str, kind: str, start_unix_us: int, duration_us: int,
                 status: str = OK, attrs: dict[str, AttrValue] | None = None) -> None:
        """Keep (and export) the span of ``trace`` as :meth:`record` would, without making a :class:`Span`.

        ``attrs`` are span attributes already (:func:`~.spans.clean_attrs`).
        The caller checks that spans are on and ``trace`` is sampled (as
        :meth:`span` does): every client call and gateway request comes here.
        """
        row: Row = (trace.trace_id, trace.span_id, trace.parent_id, self.service, self.instance, self.host, name,
                    kind, start_unix_us, duration_us, status, attrs,
                    row_cost(name, attrs) if attrs else SPAN_OVERHEAD + len(name))
        self.spans.add_row(row)
        if self.exporter is not None:
            self.exporter(Span.of(row))

    @property
    def spans_on(self) -> bool:
        """Whether spans are kept (``ObserveOptions.spans``)."""
        return self._spans_on

    def unix_us(self, perf: float) -> int:
        """The wall-clock time, in µs since the epoch, of ``perf`` (a :func:`time.perf_counter` reading)."""
        return int((perf + self._unix_offset) * 1_000_000)

    def inflight(self) -> list[dict[str, Any]]:
        """The calls and pushes being served now, oldest first."""
        now = time.perf_counter()
        return [{"method": a.name, "push": a.push, "caller": a.caller, "age_ms": round((now - a.start) * 1000, 1),
                 "trace_id": a.trace.trace_id, "meta": self.taps.visible(a.meta)}
                for a in sorted(self.active, key=lambda a: a.start)]

    def periodic_failed(self, task: str, exc: BaseException) -> None:
        """A periodic task's run raised (it keeps running): remembered for ``_mesh.info``."""
        self.crashes.append({"task": task, "unix": time.time(), "type": type(exc).__name__,
                             "message": clip(str(exc))})

    def _span_of(self, active: Active, duration_us: int, status: str) -> Span:
        t = active.trace
        return Span(t.trace_id, t.span_id, t.parent_id, self.service, self.instance, self.host, active.name,
                    "consumer" if active.push else "server", int((active.start + self._unix_offset) * 1_000_000),
                    duration_us, status)

    def _log(self, active: Active, duration_us: int, code: str | None, message: str) -> None:
        """The per-call lines of docs/logging.md: ``call served`` at DEBUG, ``call failed`` at WARNING."""
        what = "push" if active.push else "call"
        extra = {"method": active.name, "status": code or OK, "duration_ms": duration_us / 1000,
                 "caller": active.caller}
        if code is not None:
            if log.isEnabledFor(logging.WARNING):
                log.warning("%s failed", what, extra={**extra, "error": message})
            return
        # isEnabledFor first: it is cached, and false unless someone asked for DEBUG.
        if log.isEnabledFor(logging.DEBUG) and (not self.rules.rules or self.rules.level_for(active.meta)
                                                <= logging.DEBUG):
            log.debug("%s served", what, extra=extra)


def _error_message(frames: list[bytes]) -> str:
    try:
        return clip(wire.decode_error_body(frames[-1]).message)
    except (ProtocolError, IndexError):
        return ""
