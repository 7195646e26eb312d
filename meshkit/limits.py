"""Everything a call must pass before its handler runs: gates, then resources.

:class:`CallLimits` is built once per server from the handler table and the
settings: a :class:`~meshkit.concurrency.Gate` per method with
``@rpc(max_concurrency=...)``, one for the service (``Settings.max_concurrency``,
which also counts when it is 0), and a :class:`~meshkit.resources.ResourcePool`
when any method declares ``uses``. :meth:`CallLimits.enter` takes, in this
order, the method's slot, the service's slot and the resources' units, and
gives back what it took if a later step refuses; :meth:`CallLimits.leave`
gives everything back.

Refusals are :class:`Overloaded` (a gate's queue is full: nothing ran, the
caller may go elsewhere) and :class:`~meshkit.errors.ResourceExhaustedError`;
both are refusals, so the server answers them with their code and logs
nothing above debug.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from .clock import SYSTEM_CLOCK, Clock
from .codes import ErrorCode
from .concurrency import Gate, Shed
from .config import Settings
from .errors import RefusedError
from .handlers import Handler, HandlerTable
from .metrics import Metrics
from .resources import ResourcePool
from .storage import redis_client

__all__ = ["CallLimits", "Overloaded"]


class Overloaded(RefusedError):
    """Answered ``overloaded``: the call found every slot taken and the queue full; it did not run."""

    code = ErrorCode.OVERLOADED


class CallLimits:
    """The gates and resource leases of one serving instance (see the module doc)."""

    def __init__(self, service: str, table: HandlerTable, settings: Settings, *, instance_id: str = "",
                 clock: Clock = SYSTEM_CLOCK, redis: Callable[[], Any] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.clock = clock
        queued, queued_bytes = settings.max_queued_calls, settings.max_queued_call_bytes
        self.service = Gate(f"service {service}", settings.max_concurrency, queued, queued_bytes)
        self.methods: dict[str, Gate] = {
            name: Gate(f"method {name}", h.max_concurrency,
                       queued if h.max_queued is None else h.max_queued, queued_bytes)
            for name, h in table.methods.items() if h.max_concurrency
        }
        self.resources: ResourcePool | None = None
        if any(h.uses for h in table.methods.values()):
            self.resources = ResourcePool(settings, instance_id or uuid.uuid4().hex[:12],
                                          redis or (lambda: redis_client(settings)), clock=clock, metrics=metrics)
            for name, h in table.methods.items():
                self.resources.check_declared(name, h.uses)

    @property
    def load(self) -> int:
        """Calls running plus calls queued on this instance (what callers choosing by load want)."""
        # A call waiting at its method's gate has not reached the service's yet.
        return self.service.load + sum(gate.queued for gate in self.methods.values())

    async def enter(self, handler: Handler, cost: int, deadline: float | None) -> None:
        """Pass every limit of ``handler``'s call; pair every return with :meth:`leave`.

        Raises :class:`Overloaded` at once when a queue is full,
        :class:`~meshkit.errors.ResourceExhaustedError`, or
        ``DeadlineCancel`` if the deadline passes while waiting.
        """
        method = self.methods.get(handler.name)
        try:
            if method is not None:
                await method.enter(cost, deadline, self.clock)
            try:
                await self.service.enter(cost, deadline, self.clock)
                try:
                    if handler.uses and self.resources is not None:
                        await self.resources.acquire(handler.uses, deadline, handler.wait_for_resources)
                except BaseException:
                    self.service.leave()
                    raise
            except BaseException:
                if method is not None:
                    method.leave()
                raise
        except Shed as exc:
            raise Overloaded(str(exc)) from None

    def leave(self, handler: Handler) -> None:
        """Give back what :meth:`enter` took for ``handler``'s call."""
        if handler.uses and self.resources is not None:
            self.resources.release(handler.uses)
        self.service.leave()
        method = self.methods.get(handler.name)
        if method is not None:
            method.leave()

    async def close(self) -> None:
        """Give held resource slots back to the cluster."""
        if self.resources is not None:
            await self.resources.close()
