"""The push side of a server: PUSH messages received, queued and run in each sender's order.

:class:`PushSide` belongs to one :class:`~meshkit.server.Server`. A PUSH for a
topic the service subscribes to is checked against the instance's and the
connection's bounds (:mod:`meshkit.inbox`; past one it is answered
``overloaded`` and not run), queued, and run with the topic's handlers one
after another, in arrival order per sender; each is acknowledged when done
(:mod:`meshkit.answers`). A push from a numbered stream (:mod:`meshkit.sequence`)
tells its handler, through ``current_call().push_seq`` and ``.gap``, its
number and how many pushes of its stream this subscriber missed just before
it (counted in the ``push.missed`` metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, Protocol

from . import wire
from .answers import Answers
from .budget import Budget, request_cost
from .clock import Clock
from .codes import ErrorCode
from .config import Settings
from .context import CallContext, reset_current, set_current
from .errors import ProtocolError
from .handlers import HandlerTable
from .inbox import PushInbox
from .invoke import invoke
from .metrics import Metrics
from .observe.observer import Observer
from .sequence import PushSequences
from .trace import TraceContext
from .untrusted import LogThrottle, clip

__all__ = ["PushHost", "PushSide"]


class PushHost(Protocol):
    """What the push side uses of its server (:class:`meshkit.server.Server`)."""

    service: str
    table: HandlerTable
    settings: Settings
    executor: Executor
    clock: Clock
    metrics: Metrics
    held: Budget
    throttle: LogThrottle
    answers: Answers
    observer: Observer | None

    def send(self, identity: bytes, frames: list[bytes]) -> None: ...

    def reject(self, identity: bytes, request_id: int, code: str, message: str) -> None: ...

    def overloaded(self, identity: bytes, request_id: int, what: str, why: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], on_done: Callable[[], None]) -> None: ...

    def push_forbidden(self, identity: bytes, header: wire.Header) -> bool: ...


class PushSide:
    """Receives one server's pushes and runs their handlers (see the module doc)."""

    def __init__(self, server: PushHost) -> None:
        self._server = server
        self.sequences = PushSequences()  # numbered push streams, for gaps
        self.inbox = PushInbox(server.settings, server.held, server.throttle, self._run, server.spawn)

    def receive(self, identity: bytes, header: wire.Header, header_frame: bytes, body: bytes) -> None:
        """Queue a PUSH for its handlers, or answer why it will not run."""
        server = self._server
        if not server.table.topic_handlers(header.name):
            server.reject(identity, header.id, ErrorCode.UNKNOWN_METHOD,
                          f"service {server.service!r} has no handler for topic {clip(header.name)!r}")
            return
        if server.push_forbidden(identity, header):  # the access policy (meshkit.access), with CurveZMQ on
            return
        refused = self.inbox.refuse_early(identity, request_cost(header_frame, body, 0))
        if refused is not None:
            server.overloaded(identity, header.id, "push", refused)
            return
        try:
            payload, containers = wire.unpack_body(body, server.settings.max_body_containers)
        except ProtocolError as exc:
            # Answered at once: it could never run, so it need not wait its turn.
            server.metrics.push_received(header.name, 0.0, exc.code)
            server.reject(identity, header.id, exc.code, f"push payload: {exc}")
            return
        refused = self.inbox.offer(identity, header, payload, request_cost(header_frame, body, containers))
        if refused is not None:
            server.overloaded(identity, header.id, "push", refused)

    async def _run(self, identity: bytes, header: wire.Header, payload: Any, received: float) -> None:
        server = self._server
        meta, seq, gap = self.sequences.observe(header.meta)  # in each stream's order: pushes run in turn
        if gap:
            server.metrics.incr("push.missed", gap)
        ctx = CallContext(server.service, header.name, TraceContext.from_traceparent(header.traceparent),
                          None, meta, push_seq=seq, gap=gap)
        token = set_current(ctx)
        observer = server.observer
        seen = observer.started(header.name, ctx.trace, ctx.meta, identity, True) if observer else None
        cause = "push"  # then the handler's pattern; never the topic, which the peer chose
        try:
            for handler in server.table.topic_handlers(header.name):
                cause = handler.name  # the pattern, for prefix subscribers
                await invoke(handler, [payload], {}, None, server.executor, server.clock)
            code, frames = server.answers.ack(header)
        except Exception as exc:
            code, frames = server.answers.failure(header, cause, exc)
        finally:
            reset_current(token)
        if seen is not None and observer is not None:
            observer.finished(seen, code, frames, payload)
        # ``received`` is stamped by the inbox on the system clock: a latency, not a deadline.
        server.metrics.push_received(header.name, (time.monotonic() - received) * 1000, code)
        server.send(identity, frames)
