"""Spans and the bounded buffer an instance keeps them in.

A :class:`Span` is one timed piece of work: a call or push served
(``server``/``consumer``), a call or publish made (``client``/``producer``),
or a user span (``internal``). Its dict form (:meth:`Span.to_dict`) is what
``_mesh.spans`` answers: ``trace_id, span_id, parent_id, service, instance,
host, name, kind, start_unix_us, duration_us, status ("ok" or an error code),
attrs``.

:class:`SpanBuffer` keeps spans in three stores, as Go's ``x/net/trace``
does, so the spans an on-call engineer wants survive a flood of fast ones:

* the most recent ``count`` spans, whatever their latency;
* the latest ``per_bucket`` spans of each latency bucket
  (:data:`BUCKET_BOUNDS_US`), so the slow ones are still there after a
  million fast calls;
* the latest ``errors`` failed spans.

A span in several stores is held once (and counted once per store). The
whole buffer is bounded in estimated bytes too (:meth:`Span.cost`): past
``max_bytes`` the oldest recent spans go first, then the oldest of the
bucket samples.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ..untrusted import clip

# The zPages latency buckets: [0, 10 µs), [10 µs, 100 µs), ... [10 s, ∞).
BUCKET_BOUNDS_US = (0, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
KINDS = ("server", "client", "internal", "producer", "consumer")
OK = "ok"
MAX_ATTRS = 32  # attributes kept on one span; more are dropped (and counted in "attrs_dropped")
MAX_ATTR_KEY = 64
MAX_ATTR_TEXT = 512  # characters of one string attribute
_SPAN_OVERHEAD = 400  # bytes of the object, its dict slots and its ids, measured with tracemalloc
_ATTR_OVERHEAD = 120

AttrValue = str | int | float


def bucket_of(duration_us: int) -> int:
    """The index in :data:`BUCKET_BOUNDS_US` of the bucket ``duration_us`` falls in."""
    return max(0, bisect_right(BUCKET_BOUNDS_US, duration_us) - 1)


def clean_attrs(raw: Mapping[str, Any]) -> dict[str, AttrValue]:
    """``raw`` as span attributes: string keys, str/int/float values, clipped and bounded in number."""
    out: dict[str, AttrValue] = {}
    for key, value in raw.items():
        if len(out) >= MAX_ATTRS:
            out["attrs_dropped"] = len(raw) - MAX_ATTRS
            break
        k = clip(str(key), MAX_ATTR_KEY)
        if isinstance(value, bool):
            out[k] = str(value).lower()
        elif isinstance(value, (int, float)):
            out[k] = value
        else:
            out[k] = clip(value if isinstance(value, str) else repr(value), MAX_ATTR_TEXT)
    return out


class Span:
    """One finished span (the fields of the module doc)."""

    __slots__ = (
        "attrs",
        "duration_us",
        "host",
        "instance",
        "kind",
        "name",
        "parent_id",
        "service",
        "size",
        "span_id",
        "start_unix_us",
        "status",
        "trace_id",
    )

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, service: str, instance: str,
                 host: str, name: str, kind: str, start_unix_us: int, duration_us: int,
                 status: str = OK, attrs: dict[str, AttrValue] | None = None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.service = service
        self.instance = instance
        self.host = host
        self.name = name
        self.kind = kind
        self.start_unix_us = start_unix_us
        self.duration_us = duration_us
        self.status = status
        self.attrs = attrs
        self.size = 0  # cost(), stamped when a SpanBuffer keeps it

    def cost(self) -> int:
        """Estimated bytes this span holds (ids and names are shared or short; attrs dominate)."""
        total = _SPAN_OVERHEAD + len(self.name)
        if self.attrs:
            for key, value in self.attrs.items():
                total += _ATTR_OVERHEAD + len(key) + (len(value) if isinstance(value, str) else 8)
        return total

    def to_dict(self) -> dict[str, Any]:
        """The span as ``_mesh.spans`` answers it."""
        return {"trace_id": self.trace_id, "span_id": self.span_id, "parent_id": self.parent_id,
                "service": self.service, "instance": self.instance, "host": self.host, "name": self.name,
                "kind": self.kind, "start_unix_us": self.start_unix_us, "duration_us": self.duration_us,
                "status": self.status, "attrs": dict(self.attrs or {})}


class SpanBuffer:
    """The spans one instance keeps, bounded in count and bytes (see the module doc).

    Bytes are counted per store, so a span kept in two stores counts twice:
    the bound is conservative, and adding a span costs no bookkeeping of
    who holds what (this runs for every call served).
    """

    def __init__(self, count: int = 2048, max_bytes: int = 2 * 1024 * 1024, per_bucket: int = 8,
                 errors: int = 128) -> None:
        self.count = count
        self.max_bytes = max_bytes
        self.per_bucket = per_bucket
        self.max_errors = errors
        self.bytes = 0
        self.recorded = 0  # spans ever added
        self._recent: deque[Span] = deque()
        self._buckets: list[deque[Span]] = [deque() for _ in BUCKET_BOUNDS_US]
        self._errors: deque[Span] = deque()

    def __len__(self) -> int:
        return sum(1 for _ in self.spans())

    def add(self, span: Span, bucket: int | None = None) -> None:
        """Keep ``span`` (evicting what the bounds require); ``bucket`` is its :func:`bucket_of`, if known."""
        self.recorded += 1
        size = span.size = span.cost()
        recent = self._recent
        recent.append(span)
        added = size
        if len(recent) > self.count:
            added -= recent.popleft().size
        store = self._buckets[bucket_of(span.duration_us) if bucket is None else bucket]
        store.append(span)
        added += size
        if len(store) > self.per_bucket:
            added -= store.popleft().size
        if span.status != OK:
            self._errors.append(span)
            added += size
            if len(self._errors) > self.max_errors:
                added -= self._errors.popleft().size
        self.bytes += added
        while self.bytes > self.max_bytes and self._shed():
            pass

    def _shed(self) -> bool:
        """Drop the oldest recent span, else the oldest bucket sample; False when nothing is left."""
        if self._recent:
            self.bytes -= self._recent.popleft().size
            return True
        fullest = max(self._buckets, key=len)
        if fullest:
            self.bytes -= fullest.popleft().size
            return True
        if self._errors:
            self.bytes -= self._errors.popleft().size
            return True
        return False

    def spans(self) -> Iterable[Span]:
        """Every span kept, each once, oldest store order first."""
        seen: set[int] = set()
        for store in (self._recent, *self._buckets, self._errors):
            for span in store:
                if id(span) not in seen:
                    seen.add(id(span))
                    yield span

    def find(self, trace_id: str | None = None, select: str | None = None, service: str | None = None,
             limit: int = 200) -> list[Span]:
        """Spans of ``trace_id``, or the slowest (``select="slow"``) or failed (``"errors"``) ones.

        Without ``select`` the newest ``limit`` are returned, by start time;
        ``"slow"`` returns the slowest ``limit`` server spans, slowest first;
        ``"errors"`` the newest failed ones, newest first.
        """
        if select not in (None, "slow", "errors"):
            raise ValueError(f"select must be 'slow' or 'errors', got {clip(str(select))!r}")
        if select == "errors":
            found = [s for s in self._errors if _matches(s, trace_id, service)]
            return list(reversed(found))[:limit]
        found = [s for s in self.spans() if _matches(s, trace_id, service)]
        if select == "slow":
            found = [s for s in found if s.kind in ("server", "consumer")]
            found.sort(key=lambda s: s.duration_us, reverse=True)
            return found[:limit]
        found.sort(key=lambda s: s.start_unix_us)
        return found[-limit:]


def _matches(span: Span, trace_id: str | None, service: str | None) -> bool:
    return (trace_id is None or span.trace_id == trace_id) and (service is None or span.service == service)
