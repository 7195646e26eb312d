"""The reserved ``_mesh.*`` methods every instance answers (registered by the framework).

======================================  ==============================================
``_mesh.info()``                        who and what the instance is (see :func:`describe`)
``_mesh.stats()``                       per-method counters (:mod:`.stats`)
``_mesh.inflight()``                    ``[{method, push, caller, age_ms, trace_id, meta}]``
``_mesh.spans(trace_id=None,            spans kept (:meth:`.spans.SpanBuffer.find`), as dicts
select=None, service=None, limit=200)``
``_mesh.tap.open(filter=None,           a tap id (:mod:`.tap`)
max_rps=20, max_events=1000, ttl_s=60)``
``_mesh.tap.poll(tap_id, after=0)``     ``{events, next, closed, dropped}``
``_mesh.tap.close(tap_id)``             whether it was open
``_mesh.log_level(level=None,           the rules after the change (:mod:`.logfilter`);
where=None)``                           no level: only read them
======================================  ==============================================

They are answered on the event loop as soon as they arrive, before the
admission limits and the draining check, and never wait on a handler, so an
instance whose handler threads are all busy, or which is draining, still
answers them. They are neither counted in the stats nor recorded as spans.
Each is cheap and bounded: no answer exceeds ``max_message_size``
(``reply_too_large`` otherwise) and ``limit`` is at most :data:`MAX_LIMIT`.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import ProtocolError, RefusedError
from ..untrusted import clip
from .observer import Observer

PREFIX = "_mesh."
MAX_LIMIT = 2000

Send = Callable[[bytes, list[bytes]], None]


class Introspection:
    """Answers the reserved methods for one instance; ``describe`` builds ``_mesh.info``."""

    def __init__(self, observer: Observer, describe: Callable[[], dict[str, Any]], max_message_size: int,
                 max_containers: int = 10_000) -> None:
        self.observer = observer
        self.describe = describe
        self.max_message_size = max_message_size
        self.max_containers = max_containers
        self.methods: dict[str, Callable[..., Any]] = {
            "_mesh.info": self.info,
            "_mesh.stats": self.stats,
            "_mesh.inflight": self.inflight,
            "_mesh.spans": self.spans,
            "_mesh.tap.open": observer.taps.open,
            "_mesh.tap.poll": observer.taps.poll,
            "_mesh.tap.close": observer.taps.close,
            "_mesh.log_level": self.log_level,
        }
        self._signatures = {name: inspect.signature(fn) for name, fn in self.methods.items()}

    def serve(self, identity: bytes, header: wire.Header, body: bytes, send: Send) -> None:
        """Answer the reserved CALL ``header`` (its ``name`` starts with :data:`PREFIX`) at once."""
        send(identity, self.answer(header.id, header.name, body))

    def answer(self, request_id: int, name: str, body: bytes) -> list[bytes]:
        """The frames answering reserved method ``name`` with CALL body ``body``."""
        fn = self.methods.get(name)
        if fn is None:
            return wire.encode_error(request_id, "unknown_method", f"no reserved method {clip(name)!r}")
        try:
            args, kwargs, _ = wire.decode_call(body, request_id, self.max_containers)
        except ProtocolError as exc:
            return wire.encode_error(request_id, exc.code, str(exc))
        try:
            self._signatures[name].bind(*args, **kwargs)
        except TypeError as exc:
            return wire.encode_error(request_id, "bad_arguments", clip(str(exc)))
        try:
            result = fn(*args, **kwargs)
        except RefusedError as exc:
            return wire.encode_error(request_id, exc.code, clip(exc.message), type(exc).__name__)
        except ValueError as exc:
            return wire.encode_error(request_id, "bad_arguments", clip(str(exc)))
        frames = wire.encode_reply(request_id, result)
        if len(frames[1]) > self.max_message_size:
            return wire.encode_error(request_id, "reply_too_large",
                                     f"{name} answer of {len(frames[1])} bytes; ask for fewer (limit)")
        return frames

    def info(self) -> dict[str, Any]:
        return self.describe()

    def stats(self) -> dict[str, Any]:
        return self.observer.stats.to_dict()

    def inflight(self) -> list[dict[str, Any]]:
        return self.observer.inflight()

    def spans(self, trace_id: str | None = None, select: str | None = None, service: str | None = None,
              limit: int = 200) -> list[dict[str, Any]]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}")
        for what, value in (("trace_id", trace_id), ("service", service), ("select", select)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{what} must be a string")
        return [s.to_dict() for s in self.observer.spans.find(trace_id, select, service, limit)]

    def log_level(self, level: str | None = None, where: dict[str, str] | None = None) -> dict[str, Any]:
        if level is None:
            return self.observer.rules.describe()
        return self.observer.rules.set(level, where)


def describe(service: Any) -> dict[str, Any]:
    """``_mesh.info`` of a running :class:`~meshkit.Service` (read from its public parts and its server)."""
    table = service._table
    settings = service.settings
    server = service._server
    observer: Observer = service.observer
    now = time.time()
    methods = [{"name": name, "idempotent": h.idempotent, "async": h.is_async,
                "signature": f"{name}{h.signature()['text']}", "params": h.signature()["params"]}
               for name, h in sorted(table.methods.items())]
    return {
        "service": service.name, "instance": service.instance_id, "version": service.version,
        "host": observer.host, "pid": os.getpid(), "endpoint": service.endpoint,
        "started_unix": service.started_at, "uptime_s": round(now - service.started_at, 3) if service.started_at else 0,
        "state": server.state if server is not None else service.state,
        "methods": methods,
        "subscriptions": sorted(table.topics),
        "periodic": [{"name": p.name, "interval_s": p.interval} for p in table.periodic],
        "periodic_failures": service.periodic_failures,
        "recent_crashes": list(observer.crashes),
        "in_flight": server.inflight if server is not None else 0,
        "held": {"requests": server.held.count, "bytes": server.held.bytes} if server is not None else {},
        "spans": {"kept": len(observer.spans), "bytes": observer.spans.bytes,
                  "recorded": observer.spans.recorded},
        "taps_open": len(observer.taps.taps),
        "log": observer.rules.describe(),
        "settings": {k: getattr(settings, k) for k in _SHOWN_SETTINGS},
    }


_SHOWN_SETTINGS = ("namespace", "call_timeout", "publish_timeout", "drain_grace", "handler_threads",
                   "max_message_size", "max_inflight", "max_inflight_bytes", "max_calls_per_peer",
                   "max_queued_pushes", "heartbeat_interval", "ttl", "dead_after", "log_level", "debug")
