"""User spans: time a database query or a third-party call inside a handler.

::

    with self.span("sql", query=q) as span:
        rows = db.execute(q)
        span.set("rows", len(rows))

    @meshkit.traced("geocode")           # or as a decorator, sync or async
    async def lookup(self, address): ...

The span is a child of the span being served (or starts a trace outside
any call), and calls made inside it are its children, so the waterfall
shows which hop made them. An exception leaving it marks it failed with the
exception's ``code`` (a meshkit error) or type name, and goes on.
Attributes are clipped (:func:`~meshkit.observe.spans.clean_attrs`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from ..context import CallContext, current_call, reset_current, set_current
from ..trace import TraceContext
from ..untrusted import clip
from .observer import Observer
from .spans import MAX_ATTR_TEXT, OK, AttrValue, clean_attrs

F = TypeVar("F", bound=Callable[..., Any])


class _OpenSpan:
    """What a span's user may do while it is open (shared by :class:`UserSpan` and :class:`RequestSpan`)."""

    __slots__ = ("status", "trace")  # set by each subclass's constructor
    status: str | None
    trace: TraceContext | None

    def set_status(self, status: str) -> None:
        """Mark the span failed with ``status`` (an error code), whatever happens after."""
        self.status = status

    @property
    def trace_id(self) -> str:
        """The trace this span belongs to (known once entered)."""
        return self.trace.trace_id if self.trace is not None else ""


class UserSpan(_OpenSpan):
    """A context manager (sync or async) that records one ``internal`` span on ``observer``."""

    __slots__ = ("_parent", "_start", "_start_unix", "_token", "attrs", "kind", "name", "observer")

    def __init__(self, observer: Observer | None, name: str, attrs: dict[str, Any], *,
                 traceparent: str | None = None, kind: str = "internal") -> None:
        self.observer = observer
        self.name = name
        self.attrs = dict(attrs)
        self.kind = kind
        self.status: str | None = None  # set by set_status, else from the exception leaving the span
        self._parent = TraceContext.named(traceparent) if traceparent else None
        self.trace: TraceContext | None = None
        self._token: contextvars.Token[CallContext | None] | None = None
        self._start = 0.0
        self._start_unix = 0.0

    def set(self, key: str, value: Any) -> None:
        """Add or replace an attribute."""
        self.attrs[key] = value

    def __enter__(self) -> UserSpan:
        ctx = current_call()
        if ctx is None:
            self.trace = self._parent.child() if self._parent else TraceContext.new_root()
            ctx = CallContext(self.observer.service if self.observer else "", self.name, self.trace)
        else:
            self.trace = (self._parent or ctx.trace).child()
            ctx = dataclasses.replace(ctx, trace=self.trace)
        self._token = set_current(ctx)
        self._start_unix = time.time()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        duration = time.perf_counter() - self._start
        if self._token is not None:
            reset_current(self._token)
        status = self.status or (OK if exc is None else str(getattr(exc, "code", "") or type(exc).__name__))
        if exc is not None and "error" not in self.attrs:
            self.attrs.setdefault("error", str(exc))
        if self.observer is not None and self.trace is not None:
            self.observer.span(self.trace, self.name, self.kind, self._start_unix, duration, status,
                               clean_attrs(self.attrs))

    async def __aenter__(self) -> UserSpan:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)


class RequestSpan(_OpenSpan):
    """The span of one client request at a gateway: what :class:`UserSpan` records, for less.

    ``RequestSpan(observer, name, attrs, traceparent=tp)`` records the span
    ``UserSpan(observer, name, attrs, traceparent=tp, kind="server")`` would:
    a child of the span ``tp`` names (else of the call being served, else a
    new trace), with the same name, kind, status (:meth:`set_status`, else
    the code or type of the exception leaving it), attributes (plus
    ``error``, the exception's text, clipped) and times; while entered, its
    span is the current call's (so the mesh calls made inside carry it, and
    so do log lines). A ``tp`` that is not a valid ``traceparent`` starts a
    new trace whose first span is this one (:class:`UserSpan` would make it
    the child of a span nobody recorded).

    Lighter because its caller promises more: ``attrs`` are span attributes
    already (``str`` keys of at most 64 characters; ``str`` values of at most
    512, ``int`` or ``float``; the gateway's connection id), they are not
    changed after, and the span is entered once, with a plain ``with``. It
    reads the clock once at each end, and its row goes to the buffer with no
    :class:`~.spans.Span` made (:meth:`Observer.add_span`). Under
    ``bench/edge.py``'s pipelined load the gateway's :class:`UserSpan` was
    8 to 12% of its CPU (py-spy): 6.7 µs per request against 4.2 µs for this one
    on an idle core.
    """

    __slots__ = ("_observer", "_start", "_token", "_traceparent", "attrs", "kind", "name")

    def __init__(self, observer: Observer, name: str, attrs: dict[str, AttrValue], *,
                 traceparent: str | None = None, kind: str = "server") -> None:
        self._observer = observer
        self.name = name
        self.attrs = attrs
        self.kind = kind
        self.status: str | None = None
        self._traceparent = traceparent
        self.trace: TraceContext | None = None
        self._token: contextvars.Token[CallContext | None] | None = None
        self._start = 0.0

    def __enter__(self) -> RequestSpan:
        ctx = current_call()
        if self._traceparent is not None:
            trace = TraceContext.from_traceparent(self._traceparent)  # a child of it, or a new root
        elif ctx is None:
            trace = TraceContext.new_root()
        else:
            trace = ctx.trace.child()
        self.trace = trace
        self._token = set_current(CallContext(self._observer.service, self.name, trace) if ctx is None
                                  else dataclasses.replace(ctx, trace=trace))
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        end = time.perf_counter()
        if self._token is not None:
            reset_current(self._token)
            self._token = None
        trace = self.trace
        observer = self._observer
        if trace is None or not (observer.spans_on and trace.sampled):
            return
        attrs = self.attrs
        status = self.status
        if exc is not None:
            if status is None:
                status = str(getattr(exc, "code", "") or type(exc).__name__)
            if "error" not in attrs:
                attrs = {**attrs, "error": clip(str(exc), MAX_ATTR_TEXT)}
        observer.add_span(trace, self.name, self.kind, observer.unix_us(self._start),
                          int((end - self._start) * 1_000_000), status or OK, attrs)


def traced(name: str | None = None, **attrs: Any) -> Callable[[F], F]:
    """Decorate a method of a :class:`~meshkit.Service` so each run is a user span named ``name``."""

    def wrap(fn: F) -> F:
        span_name = name or fn.__name__

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(self: Any, *args: Any, **kwargs: Any) -> Any:
                with UserSpan(getattr(self, "observer", None), span_name, attrs):
                    return await fn(self, *args, **kwargs)
            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            with UserSpan(getattr(self, "observer", None), span_name, attrs):
                return fn(self, *args, **kwargs)
        return run  # type: ignore[return-value]

    return wrap
