"""``meshkit.Service``: the base class of every component.

A subclass names itself and marks its entry points::

    class Echo(meshkit.Service):
        name = "echo"

        @meshkit.rpc
        async def echo(self, value):
            return value

Lifecycle (each verb's promise):

``start()``
    Checks the advertised host against the registry grammar (a bad
    ``advertise_host`` is a :class:`ConfigError` before anything binds),
    binds the router, loads the registry view, runs :meth:`on_start`, then
    registers the instance as ``up`` (so nobody calls it before it is
    ready) and starts the ``@periodic`` tasks. An instance that cannot reach
    Redis still starts, and logs an error naming the Redis URL (password
    masked) and the cause until it is registered (see :mod:`meshkit.registration`).
``stop(grace)``
    Marks the instance ``draining`` in the registry at once, stops the
    periodic tasks, answers new calls with ``draining`` (callers retry
    elsewhere), runs :meth:`on_drain`, finishes work in flight within
    ``grace`` seconds, removes
    the record, runs :meth:`on_stop`, and closes every socket. No caller
    sees an error caused by a graceful stop.
``kill()``
    Closes everything at once without draining (tests; last resort).

From a handler: ``await self.service("other").method(x)`` or
``await self.call("other", "method", [x])`` call another service;
``await self.publish(topic, payload)`` publishes. The deadline, the trace and
the caller's metadata travel on automatically. Plain (thread-pool) handlers use
:meth:`call_blocking` and :meth:`publish_blocking`.

Collaborators: ``Service(settings)`` builds its own registry view, ZeroMQ
context, handler thread pool and metrics, and uses the system clock. Each
can be given instead as a keyword argument (``registry=``, ``zmq_context=``,
``executor=``, ``metrics=``, ``clock=``); what was given is used as it is
and left open at the end (its owner closes it), what the service built it
closes itself. :class:`meshkit.testing.ServiceHarness` runs a service this
way, in-process, on a :class:`meshkit.testing.MemoryRegistry` and a
:class:`meshkit.testing.FakeClock`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, ClassVar

import zmq

from . import names, wire
from .client import AsyncClient, ServiceProxy
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .errors import ConfigError
from .handlers import Handler, HandlerTable
from .jobs import PeriodicJobs
from .loopbridge import run_from_thread
from .metrics import Metrics
from .observe.introspect import Introspection, describe
from .observe.observer import Observer
from .observe.options import ObserveOptions
from .observe.otlp import OtlpExport, start_export
from .observe.user import UserSpan
from .record import DRAINING, UP, InstanceRecord
from .registration import Registration
from .registry import Registry
from .server import Server
from .tasks import Supervised


class Service:
    """Base class for a mesh component. Subclasses set :attr:`name`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        registry: Registry | None = None,
        zmq_context: zmq.Context[zmq.Socket[bytes]] | None = None,
        executor: Executor | None = None,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        bind_address: str | None = None,
    ) -> None:
        """Build the instance (nothing is bound or registered before :meth:`start`).

        The keyword arguments replace what the service would build (see the
        module doc). ``bind_address`` binds the router exactly there (say an
        ``ipc://`` path, for in-process tests) instead of a kernel-chosen TCP port.
        """
        if not isinstance(self.name, str) or names.SERVICE_NAME.fullmatch(self.name) is None:
            raise ConfigError(
                f"{type(self).__name__}.name must be 1-64 lower-case letters, digits, '_' or '-'; "
                f"got {self.name!r}")
        self.settings = (settings or Settings.load()).for_service(self.name)
        if not self.settings.key_name:  # CurveZMQ: a service uses its own keypair unless told (meshkit.curve)
            self.settings = self.settings.replace(key_name=self.name)
        self.instance_id = uuid.uuid4().hex[:12]
        self.log = logging.getLogger(f"meshkit.service.{self.name}")
        self.clock = clock
        self._bind_address = bind_address
        self._own_metrics = metrics is None
        self.metrics = metrics or Metrics.from_settings(self.settings, self.name)
        self._table = HandlerTable.collect(self)
        self._listeners: dict[str, str] = {}
        self._own_zmq = zmq_context is None
        self._zmq = zmq_context or zmq.Context()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(self.settings.handler_threads,
                                                        thread_name_prefix=f"{self.name}-handler")
        self._own_registry = registry is None
        self.registry = registry or Registry(self.settings, on_rejected=self._count_rejected, clock=clock)
        self.client = AsyncClient(self.settings, registry=self.registry,
                                  zmq_context=self._zmq, metrics=self.metrics)
        # What this instance knows about its own work (meshkit.observe; docs/observability.md).
        self.observer = Observer(self.name, self.instance_id, self._machine_name(),
                                 self.settings.section(ObserveOptions, self.name))
        self.client.observer = self.observer
        self._export: OtlpExport | None = None
        self._server: Server | None = None
        self._registration: Registration | None = None
        self._periodic: list[Supervised] = []
        self._periodic_jobs = PeriodicJobs(self.log, clock, self._executor, self.observer)
        self._record_updates: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self.started_at = 0.0
        self.state = "new"

    # -- hooks for subclasses ---------------------------------------------------

    async def on_start(self) -> None:
        """Run after the router is bound and before the instance is registered."""

    async def on_drain(self, grace: float) -> None:
        """Run when a graceful stop begins, after the record says ``draining``.

        The record is removed only after this returns, so a gateway can keep
        its clients' connections here (HAProxy sends it no new ones) for up to
        ``grace`` seconds.
        """

    async def on_stop(self) -> None:
        """Run after work in flight finished and the record was removed."""

    # -- for handlers -------------------------------------------------------------

    def service(self, name: str, *, timeout: float | None = None, wait: bool = False) -> ServiceProxy:
        """A proxy for calling another service: ``await self.service("x").method(...)``."""
        return self.client.service(name, timeout=timeout, wait=wait)

    async def call(self, service: str, method: str, args: Sequence[Any] = (),
                   kwargs: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                   wait: bool = False) -> Any:
        """Call another service (see :meth:`AsyncClient.call`)."""
        return await self.client.call(service, method, args, kwargs, timeout=timeout, wait=wait)

    async def publish(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """Push to every subscriber of ``topic``; returns how many acknowledged."""
        return await self.client.publish(topic, payload, timeout=timeout)

    async def push_to(self, instance_id: str, topic: str, payload: Any, *,
                      timeout: float | None = None) -> None:
        """Push to one instance by id and wait for its answer (see :meth:`AsyncClient.push_to`)."""
        await self.client.push_to(instance_id, topic, payload, timeout=timeout)

    def span(self, name: str, *, traceparent: str | None = None, kind: str = "internal",
             **attrs: Any) -> UserSpan:
        """A user span for a handler: ``with self.span("sql", query=q) as s: ...; s.set("rows", n)``.

        Sync or async ``with``; see :mod:`meshkit.observe.user`. ``traceparent``
        makes it a child of that span instead of the current one.
        """
        return UserSpan(self.observer, name, attrs, traceparent=traceparent, kind=kind)

    def call_blocking(self, service: str, method: str, args: Sequence[Any] = (),
                      kwargs: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                      wait: bool = False) -> Any:
        """:meth:`call` for plain handlers running in the thread pool."""
        return run_from_thread(self._loop, self.client.call(service, method, args, kwargs,
                                                            timeout=timeout, wait=wait))

    def publish_blocking(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """:meth:`publish` for plain handlers running in the thread pool."""
        return int(run_from_thread(self._loop, self.client.publish(topic, payload, timeout=timeout)))

    def add_subscription(self, topic: str, handler: Callable[[Any], Any]) -> None:
        """Handle pushes to ``topic`` (or a ``prefix.*`` pattern) with ``handler``.

        For topics known only at run time (from configuration); ``@subscribe``
        is the usual way. Call it before :meth:`start`, so the first record
        already lists the topic. ``handler`` takes the payload and may be async.
        """
        if self.state != "new":
            raise ConfigError("add_subscription() must be called before start()")
        self._table.add(topic, Handler(topic, handler, inspect.iscoroutinefunction(handler)))

    def advertise_listener(self, name: str, address: str) -> None:
        """Publish a client-facing listener (``host:port``) in this instance's record.

        Call it from :meth:`on_start` (or later: the record is rewritten).
        HAProxy routes the public frontend named ``name`` here. A name or an
        address outside the registry grammar raises :class:`ConfigError`.
        """
        try:
            names.validate_listener_name(name)
            names.validate_address(address)
        except ValueError as exc:
            raise ConfigError(f"cannot advertise listener: {exc}") from None
        self._listeners[name] = address
        if self._registration is not None and self._loop is not None and self.state == "up":
            record = self._record(self._registration.record.state)
            task = self._loop.create_task(self._registration.update(record))
            # Keep a reference until it is done (the loop holds tasks only weakly).
            self._record_updates.add(task)
            task.add_done_callback(self._record_updates.discard)

    @property
    def periodic_failures(self) -> int:
        """How many runs of this instance's ``@periodic`` tasks raised."""
        return self._periodic_jobs.failures

    @property
    def endpoint(self) -> str:
        return self._server.endpoint if self._server else ""

    @property
    def record(self) -> InstanceRecord:
        """What this instance registers (or would register) about itself."""
        return self._record(UP if self.state == "up" else DRAINING)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            names.validate_host(self.settings.advertised_host)
        except ValueError as exc:
            raise ConfigError(f"advertise_host (or bind_host) cannot be registered: {exc}") from None
        self._loop = asyncio.get_running_loop()
        self.started_at = time.time()
        self._server = Server(self.name, self._table, self.settings, self._zmq, self._executor, self.metrics,
                              clock=self.clock)
        self._server.observer = self.observer
        self._export = start_export(self.observer)
        self._server.reserved = Introspection(self.observer, functools.partial(describe, self),
                                              self.settings.max_message_size)
        self._server.bind(self._bind_address)
        # The failover state of this instance's own calls, for `meshkit ejections` (docs/failover.md).
        self._server.add_framework_method("_mesh.failover", self.client.pool.serve_failover_report)
        self._server.start()
        await self.client.start()
        if self._own_registry:
            await self.registry.start()
        await self.on_start()
        self.state = "up"
        self._registration = self.registry.registration(self._record(UP), self.metrics.registry_error)
        await self._registration.start()
        self._periodic = self._periodic_jobs.start(self._table.periodic)
        self.log.info("started %s at %s", self.instance_id, self.endpoint,
                      extra={"endpoint": self.endpoint, "pid": os.getpid()})

    async def stop(self, grace: float | None = None) -> None:
        if self.state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        grace = self.settings.drain_grace if grace is None else grace
        self.state = "stopping"
        self.log.info("draining (grace %.1fs)", grace)
        if self._server is not None:
            self._server.state = DRAINING
        if self._registration is not None:
            await self._registration.set_state(DRAINING)
        for job in self._periodic:
            job.cancel()
        try:
            await self.on_drain(grace)
        except Exception:
            self.log.exception("on_drain failed")
        clean = True
        if self._server is not None:
            clean = await self._server.drain(grace)
        if self._registration is not None:
            await self._registration.stop()
        try:
            await self.on_stop()
        except Exception:
            self.log.exception("on_stop failed")
        await self._close()
        self.log.info("stopped%s", "" if clean else " (grace period ran out)")

    async def kill(self) -> None:
        """Close at once, without draining or deleting the record (it expires after its TTL)."""
        self.state = "stopping"
        for job in self._periodic:
            job.cancel()
        if self._registration is not None:
            await self._registration.abandon()
        await self._close()

    async def _close(self) -> None:
        if self._server is not None:
            await self._server.limits.close()  # held resource slots go back to the cluster
            self._server.close()
        if self._export is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._export.close)  # flushes: may block
        await self.client.close()
        if self._own_registry:
            await self.registry.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_metrics:
            self.metrics.close()
        if self._own_zmq:
            self._zmq.term()
        self.state = "stopped"
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _record(self, state: str) -> InstanceRecord:
        return InstanceRecord(
            service=self.name,
            instance_id=self.instance_id,
            endpoint=self.endpoint,
            host=self._machine_name(),
            pid=os.getpid(),
            version=self.version,
            methods=tuple(sorted(self._table.methods)),
            idempotent=tuple(sorted(n for n, h in self._table.methods.items() if h.idempotent)),
            streams=tuple(sorted(n for n, h in self._table.methods.items() if h.is_stream)),
            topics=tuple(sorted(self._table.topics)),
            state=state,
            started_at=self.started_at,
            listeners=dict(self._listeners),
            max_message_size=self.settings.max_message_size,
            curve_key=self._server.door.public_key if self._server and self._server.door else "",  # CurveZMQ
            features=wire.FEATURES,
        ).with_signatures({n: h.types.text() for n, h in self._table.methods.items() if h.types is not None})

    def _machine_name(self) -> str:
        # The record's host names the machine for people; a host name the
        # registry grammar refuses (say "my_box") must not stop the service,
        # so the advertised host (checked at start) stands in for it.
        name = socket.gethostname()
        try:
            return names.validate_host(name)
        except ValueError:
            return self.settings.advertised_host

    def _count_rejected(self) -> None:
        self.metrics.incr("registry.rejected")
