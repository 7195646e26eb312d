"""Run one service in-process and drive it: calls, pushes and time, without Redis or a subprocess.

Like nameko's ``worker_factory``/``entrypoint_hook``::

    async def test_echo() -> None:
        async with ServiceHarness(Echo, clock=FakeClock()) as h:
            assert await h.call("echo", 42) == 42
            assert await h.publish("jobs.new", {"id": 1}) == 1
            h.clock.advance(1.0)  # through a heartbeat, a periodic task, a deadline

The service runs as it does in production (:meth:`Service.start`, its real
router and dispatch, the real wire bytes), with these differences:

* its registry is a :class:`~meshkit.testing.MemoryRegistry` (its own record
  included; :attr:`ServiceHarness.registry` lets a test add instances or cut
  the registry off);
* its router listens on an ``ipc://`` path in a private temporary directory,
  reached through a ZeroMQ context shared with the harness's client. (Not
  ``inproc://``: ZeroMQ reports no connection events for it, and those are
  how a client decides an instance is reachable);
* its clock is :attr:`ServiceHarness.clock`: heartbeats, ``@periodic``
  tasks, server-side deadlines and the drain move only when the test
  advances a :class:`~meshkit.testing.FakeClock`. The calling side still
  reads the real clock (its own time-out, ``timeout=`` here, defaults to
  ``call_timeout`` real seconds).

Leaving the ``async with`` stops the service with no grace (nothing waits
on the fake clock) and removes every file and socket the harness made.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import zmq

from ..client import AsyncClient
from ..config import Settings
from ..metrics import Metrics
from ..service import Service
from .clock import FakeClock
from .memory import MemoryRegistry

__all__ = ["ServiceHarness"]

S = TypeVar("S", bound=Service)


class ServiceHarness(Generic[S]):
    """One instance of ``service_class`` running in this process (see the module doc).

    ``settings`` default to ``Settings()`` (no file, no environment);
    ``clock`` to a new :class:`FakeClock`. Use as ``async with``; after
    entering, :attr:`service` is the started instance.
    """

    def __init__(self, service_class: type[S], *, clock: FakeClock | None = None,
                 settings: Settings | None = None) -> None:
        self.service_class = service_class
        self.clock = clock if clock is not None else FakeClock()
        self.settings = settings or Settings()
        self.registry = MemoryRegistry(self.settings, clock=self.clock)
        self._service: S | None = None
        self._client: AsyncClient | None = None
        self._zmq: zmq.Context[zmq.Socket[bytes]] | None = None
        self._dir = ""

    @property
    def service(self) -> S:
        """The instance under test (only between entering and leaving)."""
        if self._service is None:
            raise RuntimeError("the harness is not running; use `async with ServiceHarness(...)`")
        return self._service

    @property
    def client(self) -> AsyncClient:
        """The client the harness calls and publishes with (it sees the memory registry)."""
        if self._client is None:
            raise RuntimeError("the harness is not running; use `async with ServiceHarness(...)`")
        return self._client

    async def __aenter__(self) -> ServiceHarness[S]:
        self._dir = tempfile.mkdtemp(prefix="meshkit-harness-")
        self._zmq = zmq.Context()
        try:
            await self.registry.start()
            service = self.service_class(
                self.settings, registry=self.registry, zmq_context=self._zmq, clock=self.clock,
                metrics=Metrics("", "", self.service_class.name), bind_address=f"ipc://{self._dir}/router")
            self._service = service
            await service.start()
            self._client = AsyncClient(service.settings, registry=self.registry, zmq_context=self._zmq)
            await self._client.start()
        except BaseException:
            await self._teardown()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._teardown()

    async def call(self, method: str, *args: Any, timeout: float | None = None,
                   meta: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on the service through the real client, router and wire; return its result.

        Errors are raised as a client sees them (:class:`~meshkit.RpcError`
        subclasses, :class:`~meshkit.CallTimeoutError`, ...).
        """
        return await self.client.call(self.service.name, method, args, kwargs, timeout=timeout, meta=meta)

    async def publish(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """Push ``payload`` to ``topic``; return how many subscribers (this service, if it listens) acknowledged."""
        return await self.client.publish(topic, payload, timeout=timeout)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop the service gracefully (its drain runs on :attr:`clock`; see :meth:`Service.stop`)."""
        await self.service.stop(grace)

    async def _teardown(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._service is not None:
            if self._service.state not in ("stopped", "new"):
                await self._service.stop(0.0)
            elif self._service.state == "new":
                await self._service.kill()
            self._service = None
        await self.registry.close()
        if self._zmq is not None:
            self._zmq.term()
            self._zmq = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
