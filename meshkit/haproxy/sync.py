"""The sync process: one HAProxy kept in step with the registry.

:class:`HAProxySync` follows the registry (:class:`~meshkit.registry.Registry`)
and, in rounds, makes HAProxy match the :class:`~meshkit.haproxy.model.Model`
built from it:

Steps 1 and 2 are :class:`~meshkit.haproxy.keeper.MasterKeeper`'s; step 3
and the loop of rounds are this module's.

1. **Attach, or start one.** By default it drives the HAProxy master of its
   run directory (see :mod:`meshkit.haproxy.process`, which it outlives): the
   one running there (left by an earlier sync), else one it starts from a
   configuration listing every known server. A master lacking a listening
   socket the configuration binds by ``fd@N`` is taken over (a new master
   gets the running one's listeners, then the old one is soft-stopped). With
   ``attach=True`` it only drives an HAProxy someone else runs, through the
   given sockets, and never starts one.
2. **Structure.** When the frontends or backends (or any setting) change, it
   renders the configuration with every known server, checks it with
   ``haproxy -c``, writes it and reloads through the master CLI; listeners pass
   to the new worker, so no connection is refused. Nothing else reloads.
3. **Servers.** It reads HAProxy's real server list (``show servers state``)
   and applies :func:`~meshkit.haproxy.reconcile.plan` through the runtime API:
   add, drain, remove. Servers added at run time vanish on a reload, which is
   why the configuration carries them and why every round compares anew.

A round runs shortly after every registry change and every
``reconcile_interval`` seconds anyway, so it converges after anything: an
HAProxy restarted behind our back, a command that failed, a server still
holding connections. A dead master is replaced with every server. A
Redis outage leaves the registry's cached view, hence the servers, as they
are; nothing is removed before the registry has been read once. A server
whose record is gone is put in maintenance and deleted once its last
connection has closed; its sessions are never shut down. A round that fails
(bad data, an HAProxy that refuses) logs it, throttled, and the next round
starts afresh; the loop of rounds runs under :func:`meshkit.tasks.supervise`,
which restarts it should anything escape anyway.

**Stopping** never stops HAProxy (only :func:`~meshkit.haproxy.process.stop_haproxy`
does: ``meshkit haproxy stop``, ``meshkit down``) and is bounded:
:meth:`HAProxySync.request_stop` abandons the current round at once (a
reload, a start, a lookup: none is waited for, a cancelled one gets
:data:`CANCEL_WAIT` seconds to end), then the registry is closed within
:data:`REGISTRY_CLOSE_TIMEOUT` seconds: at most 3 s in all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from ..config import Settings
from ..record import InstanceRecord
from ..registry import Registry
from ..tasks import Supervised, supervise
from ..timing import wait_event
from ..untrusted import LogThrottle, clip
from .config import ProxyConfig
from .errors import HAProxyError, HAProxyUnreachableError, RuntimeCommandError
from .hosts import HostCache
from .keeper import MasterKeeper
from .model import Model, build_model, listener_hosts
from .process import HAProxyMaster, find_haproxy
from .reconcile import REMOVE, Step, plan
from .render import RuntimePaths
from .runtime import MasterCLI, RuntimeAPI

log = logging.getLogger("meshkit.haproxy.sync")

DEBOUNCE = 0.05  # seconds to gather a burst of registry changes into one round
CANCEL_WAIT = 1.0  # seconds a cancelled round may take to end before the stop goes on without it
REGISTRY_CLOSE_TIMEOUT = 2.0  # seconds closing the registry may take at stop
ERROR_LOG_INTERVAL = 30.0  # seconds between two log lines for the same kind of failed round


class HAProxySync:
    """Keeps one HAProxy's frontends, backends and servers in step with the registry.

    ``run`` returns soon after :meth:`request_stop` (see the module doc for
    the bound) and leaves HAProxy running. ``config`` may be replaced while
    running with :meth:`set_config` (the next round reloads HAProxy if the
    structure changed). ``clock`` and ``sleep`` drive every wait of the loop
    itself (the debounce, the supervisor's back-off), so tests drive them.
    """

    def __init__(
        self,
        settings: Settings,
        config: ProxyConfig,
        paths: RuntimePaths,
        *,
        attach: bool = False,
        haproxy: str | None = None,
        source: str = "configs/haproxy.toml",
        runtime: RuntimeAPI | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.config = config
        self.paths = paths
        self.attach = attach
        self.haproxy = haproxy or find_haproxy()
        self.source = source
        self.clock = clock
        self.sleep = sleep
        self.registry = Registry(settings)
        self.runtime = runtime or RuntimeAPI(paths.stats_socket)
        self.master = MasterCLI(paths.master_socket)
        self.keeper = MasterKeeper(config, paths, self.runtime, self.master, self.haproxy, source, attach,
                                   clock, lambda: self._stopping)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._problems: set[str] = set()
        self._failing: dict[str, str] = {}  # step -> HAProxy's last refusal, to log each refusal once
        self._unreachable_since: float | None = None
        self._errors = LogThrottle(log, ERROR_LOG_INTERVAL, clock=clock)
        self.hosts = HostCache(clock)
        self.loop: Supervised | None = None  # the supervised loop of rounds, while running
        self.rounds = 0  # completed rounds (for tests and status)

    @property
    def process(self) -> HAProxyMaster | None:
        """The HAProxy master this sync drives (None with ``attach=True``)."""
        return self.keeper.process

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Follow the registry and keep HAProxy in step until :meth:`request_stop`.

        However it ends (a stop, an error, a cancellation), the registry is
        closed before it returns; HAProxy is left running.
        """
        try:
            self.keeper.loaded = self.keeper.running_fingerprint() if self.attach else None
            await self._unless_stopped(self.registry.start())
            self.registry.add_listener(self.wake)
            self.loop = supervise("haproxy-sync", self.follow, logger=log, clock=self.clock, sleep=self.sleep)
            assert self.loop.task is not None
            await self._unless_stopped(self.loop.task)
        finally:
            if self.loop is not None:
                self.loop.cancel()
            self.registry.remove_listener(self.wake)
            await self._shutdown()

    async def follow(self) -> None:
        """The loop of rounds: one now, then one after every change or ``reconcile_interval`` seconds."""
        while not self._stopping:
            await self.round()
            await wait_event(self._wake, self.config.reconcile_interval)
            if self._wake.is_set() and not self._stopping:
                await self.sleep(DEBOUNCE)
            self._wake.clear()

    def request_stop(self) -> None:
        """Make :meth:`run` return, abandoning the current round (safe from a signal handler)."""
        self._stopping = True
        self._stop.set()
        self._wake.set()

    async def _unless_stopped(self, work: Awaitable[None]) -> None:
        """Run ``work`` until it ends or a stop is requested; then cancel it and go on.

        A cancelled ``work`` is given :data:`CANCEL_WAIT` seconds to end (a
        cancellation can be swallowed by a library), then left behind: a stop
        never waits for a reload, a start or a lookup to finish.
        """
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_WAIT)
        if task.done() and not task.cancelled():
            task.result()  # raises what the work raised

    async def _shutdown(self) -> None:
        """Close the registry within :data:`REGISTRY_CLOSE_TIMEOUT` seconds (HAProxy stays as it is)."""
        closing = asyncio.ensure_future(self.registry.close())
        try:
            await asyncio.wait({closing}, timeout=REGISTRY_CLOSE_TIMEOUT)
        finally:
            if not closing.done():
                log.warning("registry not closed in %.0fs; exiting anyway", REGISTRY_CLOSE_TIMEOUT)
                closing.cancel()
            elif not closing.cancelled() and closing.exception() is not None:
                log.warning("closing the registry failed: %s", closing.exception())
        if self.process is not None and self.process.pid is not None:
            log.info("leaving haproxy (master %d) running with its servers", self.process.pid)

    def wake(self) -> None:
        """Run a round soon (registry listener)."""
        self._wake.set()

    def set_config(self, config: ProxyConfig) -> None:
        """Use a new configuration from the next round on (a reload follows if the structure changed)."""
        self.keeper.set_config(config)
        self.config = config
        self.wake()

    # -- one round --------------------------------------------------------------

    async def round(self) -> None:
        """Bring HAProxy in line with the registry once; errors are logged (throttled), never raised."""
        try:
            records = self.registry.instances()
            await self.hosts.refresh(listener_hosts(self.config, records))
            model = self.model(records)
            if self.process is not None and not await self.keeper.ensure_master(model):
                return  # waiting to try again (backoff)
            await self.keeper.reload_if_needed(model)
            await self._reconcile(model)
        except HAProxyUnreachableError as exc:
            self._note_unreachable(exc)
        except HAProxyError as exc:
            self._errors.log(type(exc).__name__, logging.ERROR, "%s", clip(exc, 400))
        except Exception as exc:
            # Whatever it was (bad data included), the next round starts from HAProxy's real state.
            self._errors.log(type(exc).__name__, logging.ERROR, "haproxy sync round failed: %s",
                             clip(exc), exc_info=True)
        else:
            if self._unreachable_since is not None:
                log.info("haproxy answers again")
                self._unreachable_since = None
        finally:
            self.rounds += 1

    def model(self, records: Sequence[InstanceRecord] | None = None) -> Model:
        """The model for ``records`` (default: the registry's view); logs records that cannot become servers.

        Host names resolve from :attr:`hosts` only (never blocking): a name
        not looked up yet is reported as a problem until a round has.
        """
        if records is None:
            records = self.registry.instances()
        model = build_model(self.config, records, self.hosts.lookup)
        for problem in set(model.problems) - self._problems:
            log.warning("cannot route to %s", clip(problem, 300))
        self._problems = set(model.problems)
        return model

    async def _reconcile(self, model: Model) -> None:
        actual = await self.runtime.servers()
        backends = await self.runtime.backends()
        # Only backends HAProxy has: a structure haproxy -c refused is not loaded.
        live = [b for b in model.backends if b.name in backends]
        steps = plan(replace(model, backends=tuple(live)), actual, remove=self.registry.synced)
        for step in steps:
            for command in step.commands:
                try:
                    await self.runtime.command(command)
                except RuntimeCommandError as exc:
                    self._refused(step, command, exc.reply)
                    break
            else:
                self._failing.pop(str(step), None)
                log.info("%s%s", step, f" ({step.instance})" if step.instance else "")

    def _refused(self, step: Step, command: str, reply: str) -> None:
        """Log that HAProxy refused ``command`` of ``step``: once per new reply, at debug level after."""
        if self._failing.get(str(step)) == reply:
            log.debug("%s still refused at %r: %s", step, command, reply)
            return
        self._failing[str(step)] = reply
        if step.action == REMOVE and command == step.commands[-1]:
            # The delete of a server in maintenance: refused while clients are
            # still connected, which is the point. Every round tries again.
            log.info("%s waits for its connections to close (%s)", step, reply)
        else:
            log.warning("%s failed at %r: %s", step, command, reply)

    def _note_unreachable(self, exc: HAProxyUnreachableError) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = self.clock()
            log.warning("haproxy does not answer (retrying): %s", exc)
        else:
            log.debug("haproxy still does not answer: %s", exc)
