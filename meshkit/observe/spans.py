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
from typing import Any, Final

from ..untrusted import clip

# The zPages latency buckets: [0, 10 µs), [10 µs, 100 µs), ... [10 s, ∞).
BUCKET_BOUNDS_US = (0, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)
KINDS = ("server", "client", "internal", "producer", "consumer")
OK = "ok"
MAX_ATTRS = 32  # attributes kept on one span; more are dropped (and counted in "attrs_dropped")
MAX_ATTR_KEY = 64
MAX_ATTR_TEXT = 512  # characters of one string attribute
SPAN_OVERHEAD = 400  # bytes of a kept span: its 13-tuple (144, sys.getsizeof) and three id strings (81 + 2 x 65)
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


# A kept span is a plain tuple, in this order, with its estimated size last.
# Why a tuple: CPython stops tracking a tuple of strings, numbers and None in
# its garbage collector, so thousands of long-lived spans do not make every
# collection longer. Kept as objects, they cost about 5% more CPU per call
# served on bench/rpc.py's server (an A/B in one process: 7.7 µs against 1.6
# µs for the hooks themselves).
Row = tuple[str, str, "str | None", str, str, str, str, str, int, int, str, "dict[str, AttrValue] | None", int]
_STATUS: Final = 10
_SIZE: Final = 12


def row_cost(name: str, attrs: dict[str, AttrValue] | None) -> int:
    """Estimated bytes a span holds (ids and names are shared or short; attributes dominate)."""
    total = SPAN_OVERHEAD + len(name)
    if attrs:
        for key, value in attrs.items():
            total += _ATTR_OVERHEAD + len(key) + (len(value) if isinstance(value, str) else 8)
    return total


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

    @classmethod
    def of(cls, row: Row) -> Span:
        """The span a buffer kept as ``row``."""
        return cls(*row[:12])

    def row(self) -> Row:
        """The span as a buffer keeps it."""
        return (self.trace_id, self.span_id, self.parent_id, self.service, self.instance, self.host, self.name,
                self.kind, self.start_unix_us, self.duration_us, self.status, self.attrs,
                row_cost(self.name, self.attrs))

    def cost(self) -> int:
        """Estimated bytes this span holds when kept (see :func:`row_cost`)."""
        return row_cost(self.name, self.attrs)

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
        self._recent: deque[Row] = deque()
        self._buckets: list[deque[Row]] = [deque() for _ in BUCKET_BOUNDS_US]
        self._errors: deque[Row] = deque()

    def __len__(self) -> int:
        return sum(1 for _ in self._rows())

    def add(self, span: Span, bucket: int | None = None) -> None:
        """Keep ``span`` (evicting what the bounds require); ``bucket`` is its :func:`bucket_of`, if known."""
        self.add_row(span.row(), bucket)

    def add_row(self, row: Row, bucket: int | None = None) -> None:
        """Keep a span given as a :data:`Row` (the server's path: no :class:`Span` object is made)."""
        self.recorded += 1
        size = row[_SIZE]
        recent = self._recent
        recent.append(row)
        added = size
        if len(recent) > self.count:
            added -= recent.popleft()[_SIZE]
        store = self._buckets[bucket_of(row[9]) if bucket is None else bucket]
        store.append(row)
        added += size
        if len(store) > self.per_bucket:
            added -= store.popleft()[_SIZE]
        if row[_STATUS] != OK:
            self._errors.append(row)
            added += size
            if len(self._errors) > self.max_errors:
                added -= self._errors.popleft()[_SIZE]
        self.bytes += added
        while self.bytes > self.max_bytes and self._shed():
            pass

    def _shed(self) -> bool:
        """Drop the oldest recent span, else the oldest bucket sample; False when nothing is left."""
        if self._recent:
            self.bytes -= self._recent.popleft()[_SIZE]
            return True
        fullest = max(self._buckets, key=len)
        if fullest:
            self.bytes -= fullest.popleft()[_SIZE]
            return True
        if self._errors:
            self.bytes -= self._errors.popleft()[_SIZE]
            return True
        return False

    def _rows(self) -> Iterable[Row]:
        seen: set[int] = set()
        for store in (self._recent, *self._buckets, self._errors):
            for row in store:
                if id(row) not in seen:
                    seen.add(id(row))
                    yield row

    def spans(self) -> Iterable[Span]:
        """Every span kept, each once, oldest store order first."""
        return (Span.of(row) for row in self._rows())

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
            found = [r for r in self._errors if _matches(r, trace_id, service)]
            return [Span.of(r) for r in reversed(found)][:limit]
        rows = [r for r in self._rows() if _matches(r, trace_id, service)]
        if select == "slow":
            rows = [r for r in rows if r[7] in ("server", "consumer")]
            rows.sort(key=lambda r: r[9], reverse=True)
            return [Span.of(r) for r in rows[:limit]]
        rows.sort(key=lambda r: r[8])
        return [Span.of(r) for r in rows[-limit:]]


def _matches(row: Row, trace_id: str | None, service: str | None) -> bool:
    return (trace_id is None or row[0] == trace_id) and (service is None or row[3] == service)
