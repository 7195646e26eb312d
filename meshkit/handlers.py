"""The decorators that mark a service's entry points, and the table built from them.

``@rpc`` marks a method callers can call; ``@rpc(idempotent=True)`` also
allows meshkit to retry it on another instance when the first one is lost
mid-call. Limits (``docs/limits.md``): ``@rpc(max_concurrency=4)`` lets at
most 4 calls of the method run at once on an instance (``max_queued`` more
wait, default ``Settings.max_queued_calls``; past that, ``overloaded``);
``@rpc(uses={"payments_api": 1})`` takes units of named cluster-wide
resources before each call, waiting for them up to the call's deadline, or
refusing at once with ``resource_exhausted`` under ``wait_for_resources=False``.
Annotated parameters are checked (and converted where unambiguous) before
the handler runs (:mod:`meshkit.signature`). ``@subscribe("topic")`` marks a handler for pushed messages
(``"prefix.*"`` matches every topic under ``prefix.``). ``@periodic(seconds)``
marks a background task run every ``seconds`` while the instance is up.

Handlers may be ``async def`` (run on the event loop) or plain functions (run
in the service's thread pool, so they can never stall heartbeats or other
calls).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from .signature import ArgumentTypes
from .topics import topic_matches

F = TypeVar("F", bound=Callable[..., Any])

_RPC = "__meshkit_rpc__"
_SUBSCRIBE = "__meshkit_subscribe__"
_PERIODIC = "__meshkit_periodic__"

# Bounds of the topic lookup cache: entries, and bytes (Settings.topic_cache_bytes).
TOPIC_CACHE_ENTRIES = 10_000
TOPIC_CACHE_BYTES = 1024 * 1024
# What one cached entry costs besides its key: the dict slot and the list object.
_ENTRY_OVERHEAD = 120


@dataclass(frozen=True, slots=True)
class Handler:
    """One entry point, bound to a service instance."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    idempotent: bool = False
    max_concurrency: int = 0  # calls of this method running at once on an instance; 0: no limit of its own
    max_queued: int | None = None  # calls waiting for a slot; None: Settings.max_queued_calls
    uses: Mapping[str, int] = field(default_factory=dict, compare=False)  # resource name -> units per call
    wait_for_resources: bool = True  # wait up to the deadline for resource units, or refuse at once
    params: inspect.Signature | None = field(default=None, compare=False, repr=False)
    types: ArgumentTypes | None = field(default=None, compare=False, repr=False)
    is_stream: bool = False  # an async generator: its items are streamed (meshkit.streams)

    def __post_init__(self) -> None:
        # Computed once: inspect.signature costs several times the bind itself.
        if self.params is None:
            object.__setattr__(self, "params", inspect.signature(self.fn))
        if self.types is None:
            object.__setattr__(self, "types", ArgumentTypes.of(self.fn, self.params))

    def check_arguments(self, args: list[Any], kwargs: dict[str, Any]) -> str | None:
        """Why ``args``/``kwargs`` do not fit the signature, or ``None`` if they do."""
        assert self.params is not None
        try:
            self.params.bind(*args, **kwargs)
        except TypeError as exc:
            return str(exc)
        return None

    def signature(self) -> dict[str, Any]:
        """The method's signature as JSON-able data (:meth:`meshkit.signature.ArgumentTypes.describe`)."""
        assert self.types is not None
        found = self.types.describe()
        found["idempotent"] = self.idempotent
        if self.max_concurrency:
            found["max_concurrency"] = self.max_concurrency
        if self.uses:
            found["uses"] = dict(self.uses)
        return found


@dataclass(frozen=True, slots=True)
class Periodic:
    name: str
    fn: Callable[..., Any]
    interval: float
    is_async: bool


@overload
def rpc(fn: F) -> F: ...
@overload
def rpc(*, idempotent: bool = False, name: str | None = None, max_concurrency: int = 0,
        max_queued: int | None = None, uses: Mapping[str, int] | None = None,
        wait_for_resources: bool = True) -> Callable[[F], F]: ...


def rpc(fn: Any = None, *, idempotent: bool = False, name: str | None = None, max_concurrency: int = 0,
        max_queued: int | None = None, uses: Mapping[str, int] | None = None,
        wait_for_resources: bool = True) -> Any:
    """Mark a method as callable over the mesh (``@rpc`` or ``@rpc(idempotent=True, ...)``; module doc)."""
    if type(max_concurrency) is not int or max_concurrency < 0:
        raise TypeError(f"max_concurrency must be a non-negative int, got {max_concurrency!r}")
    if max_queued is not None and (type(max_queued) is not int or max_queued < 0):
        raise TypeError(f"max_queued must be a non-negative int or None, got {max_queued!r}")
    units = dict(uses or {})
    for resource, n in units.items():
        if not isinstance(resource, str) or not resource or type(n) is not int or n < 1:
            raise TypeError(f"uses maps resource names to positive ints, got {resource!r}: {n!r}")

    def mark(f: F) -> F:
        setattr(f, _RPC, {"name": name or f.__name__, "idempotent": idempotent, "max_concurrency": max_concurrency,
                          "max_queued": max_queued, "uses": units, "wait_for_resources": wait_for_resources})
        return f

    return mark(fn) if fn is not None else mark


def subscribe(*topics: str) -> Callable[[F], F]:
    """Mark a method as the handler of pushes to ``topics``; it gets the payload."""
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise TypeError("subscribe() needs one or more non-empty topic strings")

    def mark(f: F) -> F:
        setattr(f, _SUBSCRIBE, tuple(topics))
        return f

    return mark


def periodic(interval: float) -> Callable[[F], F]:
    """Mark a method to run every ``interval`` seconds while the instance runs."""
    if interval <= 0:
        raise ValueError("periodic interval must be positive")

    def mark(f: F) -> F:
        setattr(f, _PERIODIC, float(interval))
        return f

    return mark


@dataclass(slots=True)
class HandlerTable:
    """Everything an instance serves, found on the instance's class.

    ``cache_bytes`` bounds the memory of the topic lookup cache (see
    :meth:`topic_handlers`); the server sets it from ``Settings.topic_cache_bytes``.
    """

    methods: dict[str, Handler]
    topics: dict[str, list[Handler]]
    periodic: list[Periodic]
    cache_bytes: int = TOPIC_CACHE_BYTES
    _by_topic: dict[str, tuple[list[Handler], int]] = field(default_factory=dict)
    _cached_bytes: int = 0

    @classmethod
    def collect(cls, instance: object) -> HandlerTable:
        methods: dict[str, Handler] = {}
        topics: dict[str, list[Handler]] = {}
        periodic_tasks: list[Periodic] = []
        seen: set[str] = set()
        for klass in type(instance).__mro__:
            for attr, value in vars(klass).items():
                if attr in seen:
                    continue
                seen.add(attr)
                marks = [getattr(value, m, None) for m in (_RPC, _SUBSCRIBE, _PERIODIC)]
                if not any(m is not None for m in marks):
                    continue
                bound = getattr(instance, attr)
                is_stream = inspect.isasyncgenfunction(value)
                is_async = is_stream or inspect.iscoroutinefunction(value)
                rpc_mark, topic_mark, every = marks
                if rpc_mark is not None:
                    options = {k: v for k, v in rpc_mark.items() if k != "name"}
                    methods[rpc_mark["name"]] = Handler(rpc_mark["name"], bound, is_async, **options,
                                                        is_stream=is_stream)
                if topic_mark is not None:
                    for topic in topic_mark:
                        topics.setdefault(topic, []).append(Handler(topic, bound, is_async))
                if every is not None:
                    periodic_tasks.append(Periodic(attr, bound, every, is_async))
        return cls(methods, topics, periodic_tasks)

    def add(self, topic: str, handler: Handler) -> None:
        """Add a handler for ``topic`` (or a ``prefix.*`` pattern)."""
        self.topics.setdefault(topic, []).append(handler)
        self._by_topic.clear()
        self._cached_bytes = 0

    def topic_handlers(self, topic: str) -> list[Handler]:
        """Handlers for ``topic``: exact ones, then ``prefix.*`` patterns that match it.

        Looked up once per topic and remembered (a push pays a dict lookup).
        Topics that match nothing are not remembered, and the cache holds at
        most :data:`TOPIC_CACHE_ENTRIES` topics and ``cache_bytes`` bytes
        (keys counted at their real size), forgetting the oldest first: a
        ``prefix.*`` subscriber pushed endless distinct topics keeps a
        bounded cache.
        """
        cached = self._by_topic.get(topic)
        if cached is not None:
            return cached[0]
        found = list(self.topics.get(topic, ()))
        for pattern, handlers in self.topics.items():
            if pattern != topic and topic_matches((pattern,), topic):
                found.extend(handlers)
        if found:
            self._remember(topic, found)
        return found

    def _remember(self, topic: str, found: list[Handler]) -> None:
        size = sys.getsizeof(topic) + sys.getsizeof(found) + _ENTRY_OVERHEAD
        if size > self.cache_bytes:
            return
        by_topic = self._by_topic
        while by_topic and (len(by_topic) >= TOPIC_CACHE_ENTRIES or self._cached_bytes + size > self.cache_bytes):
            _, freed = by_topic.pop(next(iter(by_topic)))  # the oldest: dicts keep insertion order
            self._cached_bytes -= freed
        by_topic[topic] = (found, size)
        self._cached_bytes += size

    @property
    def cached_bytes(self) -> int:
        """Bytes the topic lookup cache holds now (at most ``cache_bytes``)."""
        return self._cached_bytes
