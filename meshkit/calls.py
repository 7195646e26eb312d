"""Serving one admitted CALL, from its start to its answer: the one place a served call starts and finishes.

:mod:`meshkit.server` admits a CALL (the service, the method, the access
policy, the draining state, the quota) and starts :func:`run_call` in a task
of its own; this module runs the handler (:func:`~meshkit.invoke.invoke`, or
:class:`~meshkit.streams.ServerStreams` for a streamed call) under its
:class:`~meshkit.context.CallContext`, sends the answer, and gives back what
the call held (:func:`release_call`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Protocol

from . import wire
from .answers import Answers
from .cancels import Running, RunningCalls
from .clock import Clock
from .codes import LocalCode
from .context import CallContext, set_current
from .handlers import Handler
from .invoke import invoke
from .limits import CallLimits
from .metrics import Metrics
from .observe.observer import Observer
from .quota import CallQuota
from .streams import ServerStreams
from .timing import DeadlineCancel
from .trace import TraceContext


class CallHost(Protocol):
    """What serving a call uses of its server (:class:`meshkit.server.Server`)."""

    service: str
    executor: Executor
    clock: Clock
    metrics: Metrics
    answers: Answers
    observer: Observer | None
    running: RunningCalls
    limits: CallLimits
    quota: CallQuota
    streams: ServerStreams

    def send(self, identity: bytes, frames: list[bytes]) -> None: ...

    def call_ended(self, task: asyncio.Task[Any] | None) -> None: ...

__all__ = ["CallHost", "release_call", "run_call"]

_CANCELLED = LocalCode.CANCELLED


def release_call(server: CallHost, identity: bytes, cost: int, request_id: int, entry: Running) -> None:
    """A call ended: give back what it held and count it out of flight."""
    server.running.remove(identity, request_id, entry)
    server.call_ended(entry.task)  # the call's own task (set by the server as it made it)
    server.quota.give(identity, cost)


async def run_call(
    server: CallHost,
    identity: bytes,
    header: wire.Header,
    handler: Handler,
    args: list[Any],
    kwargs: dict[str, Any],
    deadline: float | None,
    cost: int,
    entry: Running,
    window: int = 0,
) -> None:
    """Serve one admitted call: the one place a served call starts and finishes.

    A task cancelled before it started (only :meth:`close` does that)
    releases nothing: the server is going away. A cancelled call (CANCEL)
    is counted served with code ``cancelled`` and not answered.
    """
    started = server.clock.now()
    flag = entry.flag
    entry.started = True
    ctx = CallContext(server.service, header.name, TraceContext.from_traceparent(header.traceparent),
                      deadline, header.meta or {}, flag)
    set_current(ctx)  # this task runs in its own copy of the context
    seen = server.observer.started(header.name, ctx.trace, ctx.meta, identity) if server.observer else None
    try:
        if flag.is_set:  # cancelled before it started
            raise asyncio.CancelledError()
        try:
            result = None
            if window:  # a streamed call: its items go out as ITEMs, its REPLY is nil
                await server.streams.run(identity, header, handler, window, args, kwargs, deadline,
                                       server.limits, cost)
            else:
                result = await invoke(handler, args, kwargs, deadline, server.executor, server.clock,
                                      limits=server.limits, cost=cost, running=entry)
            code, frames = server.answers.reply(header, result)
        except Exception as exc:
            code, frames = server.answers.failure(header, handler.name, exc)
        if flag.is_set:
            raise asyncio.CancelledError()  # a plain handler that finished after its CANCEL
        server.metrics.call_served(header.name, (server.clock.now() - started) * 1000, code)
        if seen is not None and server.observer is not None:
            server.observer.finished(seen, code, frames, args)
        server.send(identity, frames)
    except asyncio.CancelledError:
        if not flag.is_set:
            raise  # close(): the server is going away
        code, frames = _CANCELLED, []
        if flag.reason == wire.DEADLINE:  # the caller's deadline: as if ours had passed (logged alike)
            code, frames = server.answers.failure(header, handler.name, DeadlineCancel())
        server.metrics.call_served(header.name, (server.clock.now() - started) * 1000, code)
        if seen is not None and server.observer is not None:  # counted and drawn, never answered
            server.observer.finished(seen, code, frames, args)
    finally:
        release_call(server, identity, cost, header.id, entry)
