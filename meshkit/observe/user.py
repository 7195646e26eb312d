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
from .observer import Observer
from .spans import OK, clean_attrs

F = TypeVar("F", bound=Callable[..., Any])


class UserSpan:
    """A context manager (sync or async) that records one ``internal`` span on ``observer``."""

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

    def set_status(self, status: str) -> None:
        """Mark the span failed with ``status`` (an error code), whatever happens after."""
        self.status = status

    @property
    def trace_id(self) -> str:
        """The trace this span belongs to (known once entered)."""
        return self.trace.trace_id if self.trace is not None else ""

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
