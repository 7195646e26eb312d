"""Where a call goes next and whether it may go again: instance choice, retry and wait decisions.

:class:`Attempts` holds the decisions :meth:`meshkit.AsyncClient`'s retry
loop (``_send_call``) makes between attempts, so that loop reads as the
contract in :mod:`meshkit.client`'s doc: which instance to try next
(:meth:`Attempts.choose`), whether a retry may be drawn from the budget
(:meth:`Attempts.take_retry`), how long to wait for an instance or a
handshake, and what counts towards an instance's ejection.
"""

from __future__ import annotations

import logging
from typing import Any

from . import wire
from .clock import Clock
from .codes import ErrorCode
from .config import Settings
from .errors import (
    CallTimeoutError,
    ClientClosedError,
    LostPeerError,
    MessageTooLargeError,
    NoInstanceError,
    error_from_wire,
)
from .metrics import Metrics
from .peer import FAILED, Peer
from .pool import PeerPool
from .record import InstanceRecord
from .registry import Registry
from .untrusted import clip

log = logging.getLogger("meshkit.client")


class Attempts:
    """The between-attempt decisions of one client (see the module doc)."""

    def __init__(self, settings: Settings, pool: PeerPool, registry: Registry, metrics: Metrics,
                 clock: Clock) -> None:
        self.settings = settings
        self.pool = pool
        self.registry = registry
        self.metrics = metrics
        self.clock = clock

    def record_of(self, instance_id: str) -> InstanceRecord:
        record = next((r for r in self.registry.instances() if r.instance_id == instance_id), None)
        if record is None:
            raise NoInstanceError(f"no live instance {clip(instance_id)!r}")
        return record

    def choose(self, service: str, tried: set[str], only: InstanceRecord | None, method: str = "") -> Peer | None:
        """The next instance to try: the pool's choice, or ``only`` (once, if it can take work)."""
        if only is None:
            return self.pool.pick(service, tried)
        if tried:
            raise NoInstanceError(f"instance {only.instance_id} did not take the call",
                                  service=service)
        peer = self.pool.peer_for(only)
        # A draining instance still answers the framework's _mesh.* methods (introspection).
        if peer is None or not (peer.available or (method.startswith("_mesh.") and peer.state != FAILED)):
            raise NoInstanceError(f"instance {only.instance_id} is not available", service=service)
        return peer

    def take_retry(self, peer: Peer, message: wire.CallMessage, reason: str,
                   answer: wire.Answer | None, wait: bool = False) -> bool:
        """Draw a retry from the budget: True to send again at once. If it is spent, raise what
        the last attempt came to, except for a request no instance took when the caller waits
        (``wait=True``): then False, and the call waits for an instance as if there were none."""
        allowed = self.pool.retry_budget.allows()
        self.metrics.call_retried(message.service, reason, allowed)
        if allowed:
            return True
        if wait and reason == "not_delivered":
            return False
        service, method = message.service, message.method
        if answer is not None:
            result_of(answer, service, method)  # raises the overloaded error
        if reason == "lost_peer":
            raise LostPeerError(f"instance {peer.key} was lost with {service}.{method} in flight "
                                "and the retry budget is spent", service=service, method=method)
        raise NoInstanceError(f"instance {peer.key} did not take {service}.{method} "
                              "and the retry budget is spent", service=service, method=method)

    def instance_failed(self, peer: Peer) -> None:
        """Count a failure of ``peer``'s instance towards its ejection (see :mod:`meshkit.ejection`)."""
        service = peer.record.service
        ejector = self.pool.ejector
        if ejector.failed(peer.key, service, self.pool.instance_keys(service)):
            log.warning("ejected instance %s of %s after failures in a row (ejection %d)", peer.key,
                        service, next((s.ejections for s in ejector.snapshot() if s.key == peer.key), 0))
            self.metrics.instance_ejected(service, ejector.ejected(service))

    async def wait_for_handshake(self, service: str, method: str, deadline: float) -> None:
        """Several instances are connecting and none is connected: wait for the first to finish (or fail)."""
        remaining = deadline - self.clock.now()
        if remaining <= 0:
            raise CallTimeoutError(f"no instance of {service!r} connected for {method} within its deadline",
                                   service=service, method=method)
        await self.pool.wait_changed(min(remaining, self.settings.dead_after))
        if self.pool.closed:
            raise ClientClosedError("client is closed")

    def check_size(self, peer: Peer, message: wire.CallMessage) -> None:
        limit = min(self.settings.max_message_size,
                    peer.record.max_message_size or self.settings.max_message_size)
        if len(message.body) > limit:
            raise MessageTooLargeError(
                f"request of {len(message.body)} bytes exceeds {message.service}'s max_message_size {limit}",
                service=message.service, method=message.method)

    async def wait_for_instance(
        self, service: str, method: str, deadline: float, wait: bool, tried_some: bool
    ) -> None:
        if not wait and not tried_some:
            raise NoInstanceError(f"no live instance of service {service!r}", service=service, method=method)
        now = self.clock.now()
        if not wait:
            # Every instance refused (draining, unreachable): give the mesh a
            # moment to settle rather than failing a call nobody ran.
            remaining = min(deadline - now, 0.05)
        else:
            remaining = deadline - now
            # Nothing announces the end of a failed instance's time-out: wake for it.
            retry_at = self.pool.next_retry(service)
            if retry_at is not None:
                remaining = min(remaining, max(0.01, retry_at - now))
        if deadline - now <= 0:
            raise CallTimeoutError(f"no instance of {service!r} answered {method} within its deadline",
                                   service=service, method=method)
        if not await self.pool.wait_changed(remaining):
            if not wait and self.pool.pick(service, set()) is None:
                raise NoInstanceError(f"no live instance of service {service!r}",
                                      service=service, method=method) from None
        if self.pool.closed:
            raise ClientClosedError("client is closed")


def result_of(answer: wire.Answer, service: str, method: str) -> Any:
    """The value of a CALL's answer, or the error it carries, raised."""
    if answer.kind == wire.REPLY:
        return answer.value
    err = answer.error or wire.ErrorBody(ErrorCode.BAD_REQUEST,
                                         f"a CALL answered by {wire.KIND_NAMES[answer.kind]}")
    raise error_from_wire(err.code, err.message, service=service, method=method,
                          remote_type=err.type, remote_traceback=err.traceback)
