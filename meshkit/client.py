"""The calling side of the mesh: pick an instance, send, correlate, retry.

:class:`AsyncClient` is what handlers (through :class:`~meshkit.Service`) and
asyncio applications use; :class:`~meshkit.Client` wraps it for blocking code.

Contracts:

* **Instance choice** is load-aware: of the available instances, two are
  drawn at random and the one with fewer requests in flight from this process
  wins ("power of two choices"). Instances with a live connection are
  preferred over ones still connecting.
* **Deadlines**: every call has one (``timeout`` or ``Settings.call_timeout``,
  never later than the deadline of the call being served). It travels in the
  message; the callee does not start work that is already late.
* **Retries**: a request that cannot have reached its instance (no
  connection, instance draining) is sent to another one. A request in flight
  to an instance that is lost is retried only if the method is declared
  ``idempotent``; otherwise it fails with :class:`LostPeerError`.
* **No instance**: by default a call fails at once with
  :class:`NoInstanceError`. With ``wait=True`` it waits for an instance to
  appear, up to its deadline (then :class:`CallTimeoutError`).
* The request path reads only memory: the registry view and the peers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import zmq

from . import wire
from .config import Settings
from .context import current_call
from .errors import (
    DRAINING,
    CallTimeoutError,
    ClientClosedError,
    LostPeerError,
    MessageTooLargeError,
    NoInstanceError,
    ProtocolError,
    error_from_wire,
)
from .metrics import Metrics
from .peer import CONNECTED, FAILED, Peer, Pending
from .record import InstanceRecord
from .registry import Registry, wait_event
from .trace import TraceContext

log = logging.getLogger("meshkit.client")

# How long a failed instance is left alone before we try connecting again
# (while the registry still lists it).
_RETRY_FAILED_AFTER = 2.0


class _Retry(Exception):
    """Internal: the request did not run; send it to another instance."""


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
    ) -> None:
        self.settings = settings
        self._own_registry = registry is None
        self.registry = registry or Registry(settings)
        self._own_ctx = zmq_context is None
        self._ctx = zmq_context or zmq.Context()
        self.metrics = metrics or Metrics("", "", "")
        self._peers: dict[str, Peer] = {}
        self._failed_at: dict[str, float] = {}
        self._ids = itertools.count(random.getrandbits(32) + 1)
        self._closed = False
        self._started = False
        self._pid = os.getpid()
        self._available = asyncio.Event()

    async def start(self) -> None:
        """Load the registry view (if this client owns it) and start following it."""
        if self._started:
            return
        self._started = True
        self.registry.add_listener(self._on_registry_change)
        if self._own_registry:
            await self.registry.start()

    async def close(self) -> None:
        """Close every connection; waiting calls fail with :class:`LostPeerError`."""
        if self._closed:
            return
        self._closed = True
        self.registry.remove_listener(self._on_registry_change)
        for peer in list(self._peers.values()):
            peer.fail(lost=True, reason="closed by client")
        self._peers.clear()
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
        return ServiceProxy(self.call, name, timeout, wait)

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
    ) -> Any:
        """Call ``service.method(*args, **kwargs)`` on one instance; return its result.

        Raises a :class:`~meshkit.errors.CallError` subclass on failure (see
        the module doc for which and when).
        """
        if self._closed:
            raise ClientClosedError("client is closed")
        started = time.monotonic()
        deadline, trace, meta = self._outgoing(timeout, meta)
        body = wire.pack([list(args), dict(kwargs or {})])
        if len(body) > self.settings.max_message_size:
            raise MessageTooLargeError(
                f"request of {len(body)} bytes exceeds max_message_size "
                f"{self.settings.max_message_size}", service=service, method=method)
        traceparent = trace.traceparent()
        tried: set[str] = set()
        code: str | None = None
        try:
            while True:
                peer = self._pick(service, tried)
                if peer is None:
                    await self._wait_for_instance(service, method, deadline, wait, bool(tried))
                    tried.clear()
                    continue
                idempotent = method in peer.record.idempotent
                try:
                    return await self._send_call(
                        peer, service, method, body, deadline, traceparent, meta, idempotent
                    )
                except _Retry:
                    tried.add(peer.key)
        except BaseException as exc:
            code = getattr(exc, "code", "cancelled")
            raise
        finally:
            self.metrics.call_made(service, method, (time.monotonic() - started) * 1000, code)

    async def _send_call(
        self,
        peer: Peer,
        service: str,
        method: str,
        body: bytes,
        deadline: float,
        traceparent: str,
        meta: Mapping[str, str] | None,
        idempotent: bool,
    ) -> Any:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise CallTimeoutError(f"{service}.{method} timed out", service=service, method=method)
        request_id = next(self._ids)
        header = wire.encode_call_header(request_id, service, method, int(remaining * 1000), traceparent, meta)
        future: asyncio.Future[Any] = loop.create_future()

        def on_answer(kind: int, frame: bytes) -> None:
            if future.done():
                return
            try:
                if kind == wire.REPLY:
                    future.set_result(wire.unpack(frame))
                    return
                if kind != wire.ERROR:
                    raise ProtocolError("bad_request", f"unexpected answer kind {kind}")
                err = wire.decode_error_body(frame)
            except ProtocolError as exc:
                future.set_exception(error_from_wire("bad_request", str(exc), service=service, method=method))
                return
            if err.code == DRAINING:
                peer.draining = True
                self._notify_available()
                future.set_exception(_Retry())
            else:
                future.set_exception(error_from_wire(
                    err.code, err.message, service=service, method=method,
                    remote_type=err.type, remote_traceback=err.traceback))

        def on_fail(lost: bool) -> None:
            if future.done():
                return
            if lost and not idempotent:
                future.set_exception(LostPeerError(
                    f"instance {peer.key} was lost with {service}.{method} in flight",
                    service=service, method=method))
            else:
                future.set_exception(_Retry())

        if not peer.send([header, body]):
            raise _Retry()
        peer.pending[request_id] = Pending(on_answer, on_fail)
        timer = loop.call_at(deadline, _expire, future, service, method)
        try:
            return await future
        finally:
            timer.cancel()
            peer.pending.pop(request_id, None)

    async def _wait_for_instance(
        self, service: str, method: str, deadline: float, wait: bool, tried_some: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        if not wait and not tried_some:
            raise NoInstanceError(f"no live instance of service {service!r}", service=service, method=method)
        if not wait:
            # Every instance refused (draining, unreachable): give the mesh a
            # moment to settle rather than failing a call nobody ran.
            remaining = min(deadline - loop.time(), 0.05)
        else:
            remaining = deadline - loop.time()
        if remaining <= 0:
            raise CallTimeoutError(f"no instance of {service!r} answered {method} within its deadline",
                                   service=service, method=method)
        self._available.clear()
        if not await wait_event(self._available, remaining):
            if not wait and self._pick(service, set()) is None:
                raise NoInstanceError(f"no live instance of service {service!r}",
                                      service=service, method=method) from None

    def _outgoing(
        self, timeout: float | None, meta: Mapping[str, str] | None
    ) -> tuple[float, TraceContext, Mapping[str, str] | None]:
        """Deadline, span and metadata for an outgoing message."""
        now = asyncio.get_running_loop().time()
        deadline = now + (self.settings.call_timeout if timeout is None else timeout)
        ctx = current_call()
        if ctx is None:
            return deadline, TraceContext.new_root(), meta
        if ctx.deadline is not None:
            deadline = min(deadline, ctx.deadline)
        if meta:
            merged = dict(ctx.meta)
            merged.update(meta)
            return deadline, ctx.trace, merged
        return deadline, ctx.trace, ctx.meta

    # -- choosing instances ---------------------------------------------------

    def _pick(self, service: str, exclude: set[str]) -> Peer | None:
        connected: list[Peer] = []
        connecting: list[Peer] = []
        for record in self.registry.instances(service):
            if record.key in exclude or not record.is_up:
                continue
            peer = self._peers.get(record.key) or self._connect(record)
            if peer is None or not peer.available:
                continue
            (connected if peer.state == CONNECTED else connecting).append(peer)
        candidates = connected or connecting
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return a if a.load <= b.load else b

    def _connect(self, record: InstanceRecord) -> Peer | None:
        failed = self._failed_at.get(record.key)
        if failed is not None and time.monotonic() - failed < _RETRY_FAILED_AFTER:
            return None
        self._check_fork()
        peer = Peer(record, self._ctx, self.settings, self._on_peer_message, self._on_peer_state)
        self._peers[record.key] = peer
        return peer

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise ClientClosedError("a client cannot be used across fork(); make a new one")

    def _on_peer_state(self, peer: Peer) -> None:
        if peer.state == FAILED:
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]
            self._failed_at[peer.key] = peer.failed_at
        self._notify_available()

    def _on_registry_change(self) -> None:
        for key, peer in list(self._peers.items()):
            record = self.registry.get(key)
            if record is None:
                # Gone from the registry: finish what is in flight, then close.
                if not peer.pending:
                    peer.close()
                    del self._peers[key]
                else:
                    peer.draining = True
            else:
                peer.update(record)
        self._failed_at = {k: t for k, t in self._failed_at.items() if self.registry.get(k) is not None}
        self._notify_available()

    def _notify_available(self) -> None:
        self._available.set()

    def _on_peer_message(self, peer: Peer, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("dropping %d-frame message from %s", len(frames), peer.key)
            return
        try:
            header = wire.decode_header(frames[0])
        except ProtocolError as exc:
            log.warning("dropping malformed answer from %s: %s", peer.key, exc)
            return
        pending = peer.pending.pop(header.id, None)
        if pending is not None:
            pending.on_answer(header.kind, frames[1])
        if peer.draining and not peer.pending and self.registry.get(peer.key) is None:
            peer.close()
            self._peers.pop(peer.key, None)

    # -- publishing -----------------------------------------------------------

    async def publish(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """Push ``payload`` to every instance subscribed to ``topic``.

        Returns how many subscribers acknowledged it (ran their handler)
        within ``timeout`` (default ``Settings.publish_timeout``). A slow or
        dead subscriber delays this by at most the timeout; it still receives
        the message later, in order, if it is alive. Never raises for a
        missing or failing subscriber; raises :class:`MessageTooLargeError`
        for an oversized payload.
        """
        if self._closed:
            raise ClientClosedError("client is closed")
        loop = asyncio.get_running_loop()
        bound = self.settings.publish_timeout if timeout is None else timeout
        deadline, trace, meta = self._outgoing(bound, None)
        body = wire.pack(payload)
        if len(body) > self.settings.max_message_size:
            raise MessageTooLargeError(f"payload of {len(body)} bytes exceeds max_message_size")
        traceparent = trace.traceparent()
        timeout_ms = max(0, int((deadline - loop.time()) * 1000))
        waits: list[asyncio.Future[bool]] = []
        subscribers = self.registry.subscribers(topic)
        for record in subscribers:
            peer = self._peers.get(record.key) or self._connect(record)
            if peer is None or peer.state == FAILED:
                continue
            request_id = next(self._ids)
            header = wire.encode_push_header(request_id, topic, timeout_ms, traceparent, meta)
            if not peer.send([header, body]):
                continue
            future: asyncio.Future[bool] = loop.create_future()
            peer.pending[request_id] = Pending(_ack_answer(future), _ack_fail(future))
            waits.append(future)
        delivered = 0
        if waits:
            done, not_done = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()))
            delivered = sum(1 for f in done if not f.cancelled() and f.result())
            for f in not_done:
                f.cancel()
        self.metrics.published(topic, len(subscribers), delivered)
        return delivered


def _expire(future: asyncio.Future[Any], service: str, method: str) -> None:
    if not future.done():
        future.set_exception(CallTimeoutError(
            f"{service}.{method} got no reply within its deadline", service=service, method=method))


def _ack_answer(future: asyncio.Future[bool]) -> Callable[[int, bytes], None]:
    def on_answer(kind: int, frame: bytes) -> None:
        if not future.done():
            future.set_result(kind == wire.ACK)
    return on_answer


def _ack_fail(future: asyncio.Future[bool]) -> Callable[[bool], None]:
    def on_fail(lost: bool) -> None:
        if not future.done():
            future.set_result(False)
    return on_fail


CallFn = Callable[..., Awaitable[Any]]


class ServiceProxy:
    """Attribute access names a method; calling it calls the service.

    Made by :meth:`AsyncClient.service` (awaitable results) and
    :meth:`meshkit.Client.service` (blocking results).
    """

    def __init__(self, call: Callable[..., Any], service: str, timeout: float | None, wait: bool) -> None:
        self._call = call
        self._service = service
        self._timeout = timeout
        self._wait = wait

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def invoke(*args: Any, **kwargs: Any) -> Any:
            return self._call(self._service, method, args, kwargs, timeout=self._timeout, wait=self._wait)

        invoke.__name__ = method
        return invoke
