"""The calling side of the mesh: pick an instance, send, correlate, retry.

:class:`AsyncClient` is what handlers (through :class:`~meshkit.Service`) and
asyncio applications use; :class:`~meshkit.Client` wraps it for blocking code.

Contracts:

* **Instance choice** is load-aware (see :mod:`meshkit.pool`).
* **Deadlines**: every call has one (``timeout`` or ``Settings.call_timeout``,
  never later than the deadline of the call being served). It travels in the
  message; the callee does not start work that is already late.
* **Retries**: a request that cannot have run on its instance (no
  connection, connection refused, instance draining or ``overloaded``, the
  endpoint now serves another service) is sent to another one at once. A
  request in flight to an instance that is lost is retried only if the
  method is declared ``idempotent``; otherwise it fails with
  :class:`LostPeerError`. Every retry is drawn from the pool's retry budget
  (:mod:`meshkit.retrybudget`); when it is spent the call fails with what
  its last attempt came to (``overloaded``, :class:`LostPeerError`, or
  :class:`NoInstanceError` for a request no instance took) -- except that a
  call made with ``wait=True`` whose request no instance took waits for an
  instance up to its deadline, as one with no instance does (instances all
  restarting at once is the case ``wait`` is for; its next attempt waits for
  a change in the instances, so it cannot storm).
* **Fail over at once**: while several instances are still connecting and
  none is connected (a fresh client), a call waits for the first handshake
  rather than queue behind one that may never complete; a refused
  connection fails its peer at once (see :mod:`meshkit.peer`).
* **Outlier ejection**: lost peers, deadlines passed and answers with one of
  ``Settings.eject_codes`` count against the instance; enough in a row eject
  it from this client's choice for a while (:mod:`meshkit.ejection`).
* **No instance**: by default a call fails at once with
  :class:`NoInstanceError`. With ``wait=True`` it waits for an instance to
  appear, up to its deadline (then :class:`CallTimeoutError`).
* **Sizes**: a request larger than this client's or the receiving
  instance's ``max_message_size`` (from its record) fails with
  :class:`MessageTooLargeError` before anything is sent.
* **Closing**: calls waiting when the client closes, or made after, fail with
  :class:`ClientClosedError`.
* The request path reads only memory: the registry view and the peers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from . import wire
from .attempts import Attempts, result_of
from .codes import ErrorCode, LocalCode
from .config import Settings
from .context import current_call
from .errors import (
    CallTimeoutError,
    ClientClosedError,
    LostPeerError,
)
from .exchange import DeadlinePassed, LostInFlight, NotDelivered
from .metrics import Metrics
from .observe.observer import Observer
from .peer import CONNECTING
from .pool import PeerPool
from .proxy import ServiceProxy as ServiceProxy  # re-exported: where callers have always found it
from .publish import publish, push_one
from .record import InstanceRecord
from .registry import Registry
from .streams import DEFAULT_WINDOW, STREAM_META, Stream
from .trace import TraceContext
from .untrusted import clip

log = logging.getLogger("meshkit.client")


class AsyncClient:
    """Calls and publishes into the mesh from an asyncio program.

    Use ``async with AsyncClient(settings) as client`` or call :meth:`start`
    and :meth:`close`. A :class:`~meshkit.Service` builds one for its
    handlers, sharing its registry view.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry | None = None,
        zmq_context: zmq.Context[zmq.Socket[bytes]] | None = None,
        metrics: Metrics | None = None,
        pool: PeerPool | None = None,
    ) -> None:
        self.settings = settings
        self._own_registry = registry is None
        self.registry = registry or Registry(settings)
        self._own_ctx = zmq_context is None
        self._ctx = zmq_context or zmq.Context()
        self.metrics = metrics or Metrics("", "", "")
        # ``pool``: for tests, one over fake peers (its registry must be ``registry``).
        self.pool = pool or PeerPool(settings, self.registry, self._ctx)
        self.exchange = self.pool.exchange
        self.clock = self.pool.clock
        self.attempts = Attempts(settings, self.pool, self.registry, self.metrics, self.clock)
        self._started = False
        self.observer: Observer | None = None  # set by a Service: client spans go to its buffer

    async def start(self) -> None:
        """Load the registry view (if this client owns it) and start following it."""
        if self._started:
            return
        self._started = True
        self.pool.start()
        if self._own_registry:
            await self.registry.start()

    async def close(self) -> None:
        """Close every connection; waiting calls fail with :class:`ClientClosedError`.

        Instances that hear CANCEL are told of every call still in flight first.
        """
        if self.pool.closed:
            return
        self.exchange.cancel_all()
        self.pool.close()
        if self._own_registry:
            await self.registry.close()
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def service(self, name: str, *, timeout: float | None = None, wait: bool = False) -> ServiceProxy:
        """A proxy whose attributes are the service's methods::

            total = await client.service("cart").add(item, qty=2)
        """
        return ServiceProxy(self.call, name, timeout, wait, self.stream)

    # -- calls --------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        wait: bool = False,
        meta: Mapping[str, str] | None = None,
        traceparent: str | None = None,
    ) -> Any:
        """Call ``service.method(*args, **kwargs)`` on one instance; return its result.

        Raises a :class:`~meshkit.errors.CallError` subclass on failure (see
        the module doc for which and when), ``ValueError`` for a service or
        method name longer than ``Settings.max_name_length``.

        ``traceparent`` (a W3C header value) makes the call part of that
        trace instead of the current one: make one with
        ``TraceContext.new_root()`` to learn the trace id of a call made
        outside any handler (``meshkit trace`` finds it afterwards).
        """
        return await self._call(service, method, args, kwargs, timeout, wait, meta, None, traceparent)

    def stream(self, service: str, method: str, *args: Any, timeout: float | None = None,
               window: int = DEFAULT_WINDOW, meta: Mapping[str, str] | None = None, **kwargs: Any) -> Stream:
        """``async for item in client.stream(service, method, *args)``: a streamed call (:mod:`meshkit.streams`).

        ``timeout`` bounds the whole stream (:class:`CallTimeoutError` when it
        passes); at most ``window`` items are buffered here, and the instance
        makes no more until they are consumed. Stopping early cancels it.
        """
        if self.pool.closed:
            raise ClientClosedError("client is closed")
        _check_name("service", service, self.settings.max_name_length)
        _check_name("method", method, self.settings.max_name_length)
        deadline, trace, merged = self._outgoing(timeout, meta)
        marked = {**(merged or {}), STREAM_META: str(window)}
        message = wire.CallMessage(service, method, wire.encode_call_body(args, kwargs), trace.traceparent(), marked)
        return Stream(self.pool, message, deadline, window)

    async def call_instance(self, instance_id: str, method: str, *args: Any,
                            timeout: float | None = None, **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` on the one instance ``instance_id``; return its result.

        The instance is looked up in the registry view by id
        (:class:`NoInstanceError` if it is not there). There is no failover:
        if that instance does not take the call (it is draining, unreachable,
        or left alone after a failure) the call fails with
        :class:`NoInstanceError`; if it is lost with the call in flight, with
        :class:`LostPeerError`, idempotent or not. Methods named
        ``_mesh.*`` are the framework's own (see :mod:`meshkit.server`).
        """
        if self.pool.closed:
            raise ClientClosedError("client is closed")
        record = self.attempts.record_of(instance_id)
        return await self._call(record.service, method, args, kwargs, timeout, False, None, record)

    async def _call(
        self,
        service: str,
        method: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        timeout: float | None,
        wait: bool,
        meta: Mapping[str, str] | None,
        only: InstanceRecord | None,
        traceparent: str | None = None,
    ) -> Any:
        """The one place a call starts and finishes (``call_made`` counts it, whatever the outcome)."""
        if self.pool.closed:
            raise ClientClosedError("client is closed")
        _check_name("service", service, self.settings.max_name_length)
        _check_name("method", method, self.settings.max_name_length)
        started = self.clock.now()
        deadline, trace, meta = self._outgoing(timeout, meta, traceparent)
        observer, start_unix = self.observer, time.time()
        if observer is not None:
            trace = trace.child()  # the client span: the callee's span is its child
        message = wire.CallMessage(service, method, wire.encode_call_body(args, kwargs or {}),
                                   trace.traceparent(), meta)
        code: str | None = None
        try:
            return await self._send_call(message, deadline, wait, only)
        except BaseException as exc:
            code = getattr(exc, "code", LocalCode.CANCELLED)
            raise
        finally:
            elapsed = self.clock.now() - started
            self.metrics.call_made(service, method, elapsed * 1000, code)
            if observer is not None:
                observer.span(trace, f"{service}.{method}", "client", start_unix, elapsed, code or "ok")

    async def _send_call(self, message: wire.CallMessage, deadline: float, wait: bool,
                         only: InstanceRecord | None) -> Any:
        """Send to one instance after another until one answers (see the module doc for when it retries)."""
        service, method = message.service, message.method
        pool = self.pool
        ejector = pool.ejector
        watched = ejector.records  # empty (nothing to tell the ejector of a success) nearly always
        pool.retry_budget.called()
        tried: set[str] = set()
        overloaded: wire.Answer | None = None  # the last instance's refusal, while no other has been tried
        while True:
            peer = self.attempts.choose(service, tried, only, method)
            if peer is None:
                if overloaded is not None:  # every instance refused before running it: say so now
                    return result_of(overloaded, service, method)
                await self.attempts.wait_for_instance(service, method, deadline, wait, bool(tried))
                tried.clear()
                continue
            if peer.state == CONNECTING and only is None and pool.racing(service, tried):
                await self.attempts.wait_for_handshake(service, method, deadline)
                continue
            self.attempts.check_size(peer, message)
            if watched:
                ejector.sent(peer.key)
            sent = False
            try:
                future = self.exchange.start(peer, message, deadline)
                sent = True
                try:
                    answer = await future
                except asyncio.CancelledError:  # the caller gave up (its task, wait_for): tell the instance
                    self.exchange.withdraw(peer, future)
                    raise
            except NotDelivered:
                reason = "not_delivered"  # it cannot have run: another instance may take it
            except LostInFlight:
                # It may have run: again elsewhere only if the method says that is safe.
                self.attempts.instance_failed(peer)
                if pool.closed or only is not None or method not in peer.record.idempotent:
                    if pool.closed:
                        raise ClientClosedError("client closed while the call was in flight") from None
                    raise LostPeerError(f"instance {peer.key} was lost with {service}.{method} in flight",
                                        service=service, method=method) from None
                reason = "lost_peer"
            except DeadlinePassed:
                if sent:  # late before it was sent is no fault of the instance
                    self.attempts.instance_failed(peer)
                raise CallTimeoutError(f"{service}.{method} got no reply within its deadline",
                                       service=service, method=method) from None
            else:
                error = answer.error
                if error is None:
                    if watched:
                        ejector.succeeded(peer.key)
                    return result_of(answer, service, method)
                if error.code != ErrorCode.OVERLOADED or only is not None:
                    if error.code in ejector.codes:
                        self.attempts.instance_failed(peer)
                    else:
                        ejector.succeeded(peer.key)
                    return result_of(answer, service, method)
                reason = "overloaded"  # refused before it ran: like draining, try another instance
                overloaded = answer
            if pool.closed:
                raise ClientClosedError("client closed while the call was in flight")
            tried.add(peer.key)
            if overloaded is not None and not set(pool.instance_keys(service)) - tried:
                return result_of(overloaded, service, method)  # no other instance to ask: no retry drawn
            if not self.attempts.take_retry(peer, message, reason, answer if reason == "overloaded" else None, wait):
                # Nothing ran it and the caller waits: no attempt until the instances change.
                await self.attempts.wait_for_instance(service, method, deadline, True, True)

    def _outgoing(
        self, timeout: float | None, meta: Mapping[str, str] | None, traceparent: str | None = None
    ) -> tuple[float, TraceContext, Mapping[str, str] | None]:
        """Deadline (monotonic), span and metadata for an outgoing message."""
        deadline = self.clock.now() + (self.settings.call_timeout if timeout is None else timeout)
        ctx = current_call()
        if ctx is None:
            trace = TraceContext.new_root() if traceparent is None else TraceContext.named(traceparent)
            return deadline, trace, meta
        trace = ctx.trace if traceparent is None else TraceContext.named(traceparent)
        if ctx.deadline is not None:
            deadline = min(deadline, ctx.deadline)
        if meta:
            merged = dict(ctx.meta)
            merged.update(meta)
            return deadline, trace, merged
        return deadline, trace, ctx.meta

    # -- publishing -----------------------------------------------------------

    async def publish(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """Push ``payload`` to every instance subscribed to ``topic`` (see :mod:`meshkit.publish`).

        Returns how many subscribers acknowledged it (ran their handler)
        within ``timeout`` (default ``Settings.publish_timeout``). Never raises
        for a missing or failing subscriber; raises
        :class:`MessageTooLargeError` for an oversized payload and
        ``ValueError`` for a topic longer than ``Settings.max_name_length``.
        """
        if self.pool.closed:
            raise ClientClosedError("client is closed")
        _check_name("topic", topic, self.settings.max_name_length)
        bound = self.settings.publish_timeout if timeout is None else timeout
        deadline, trace, meta = self._outgoing(bound, None)
        observer, start_unix = self.observer, time.time()
        if observer is not None:
            trace = trace.child()  # the producer span
        subscribers, delivered = await publish(self.pool, topic, payload, deadline, trace.traceparent(), meta)
        self.metrics.published(topic, subscribers, delivered)
        if observer is not None:
            observer.span(trace, f"publish {topic}", "producer", start_unix, time.time() - start_unix, "ok",
                          {"subscribers": subscribers, "delivered": delivered})
        return delivered

    async def push_to(self, instance_id: str, topic: str, payload: Any, *,
                      timeout: float | None = None) -> None:
        """Push ``payload`` on ``topic`` to the one instance ``instance_id``; return once it ran.

        Unlike :meth:`publish` this addresses an instance, not the
        subscribers of a topic, and reports its answer: it raises
        :class:`NoInstanceError` if the registry view has no such instance,
        else what :func:`meshkit.publish.push_one` raises (the handler's
        :class:`~meshkit.errors.RefusedError`, a timeout, a lost peer). It
        shares its connection with :meth:`publish`'s pushes to that instance,
        so pushes from one sender arrive in the order they were sent.
        """
        if self.pool.closed:
            raise ClientClosedError("client is closed")
        record = self.attempts.record_of(instance_id)
        bound = self.settings.publish_timeout if timeout is None else timeout
        deadline, trace, meta = self._outgoing(bound, None)
        await push_one(self.pool, record, topic, payload, deadline, trace.traceparent(), meta)


def _check_name(what: str, name: str, limit: int) -> None:
    # Receivers refuse longer names (bad_request); a publish would fail silently.
    if len(name) > limit:
        raise ValueError(f"{what} name of {len(name)} characters exceeds max_name_length {limit}: {clip(name)!r}")
