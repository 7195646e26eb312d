"""The sync process: one HAProxy kept in step with the registry.

:class:`HAProxySync` follows the registry (:class:`~meshkit.registry.Registry`)
and, in rounds, makes HAProxy match the :class:`~meshkit.haproxy.model.Model`
built from it:

1. **Own or attach.** By default it owns an HAProxy master (see
   :mod:`meshkit.haproxy.process`), started from a configuration that already
   lists every known server. Attached (``attach=True``), it drives an HAProxy
   someone else runs, through the given stats and master sockets.
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
holding connections. A dead owned master is restarted with every server. A
Redis outage leaves the registry's cached view, hence the servers, as they
are; nothing is removed before the registry has been read once. A server
whose record is gone is put in maintenance and deleted once its last
connection has closed; its sessions are never shut down.

**Stopping** is bounded: :meth:`HAProxySync.request_stop` abandons the
current round at once (a reload, a start, a lookup: none is waited for), then
the registry is closed and an owned HAProxy stopped side by side. The whole
stop takes at most :data:`CANCEL_WAIT` + max(``stop_timeout`` +
:data:`~meshkit.haproxy.process.REAP_TIMEOUT`, :data:`REGISTRY_CLOSE_TIMEOUT`)
seconds: 12 s with the default ``stop_timeout`` of 10 s, 3 s when attached.
An owned HAProxy still running at the end of its budget is SIGKILLed,
workers included (see :meth:`~meshkit.haproxy.process.HAProxyProcess.stop`),
on every way out of :meth:`HAProxySync.run`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

from ..config import Settings
from ..record import InstanceRecord
from ..registry import Registry
from ..timing import wait_event
from .config import ProxyConfig
from .errors import ConfigCheckError, HAProxyError, HAProxyUnreachableError, ReloadError, RuntimeCommandError
from .hosts import HostCache, detached
from .model import Model, build_model, listener_hosts
from .process import HAProxyProcess, find_haproxy
from .reconcile import REMOVE, Step, plan
from .render import RuntimePaths, check_config, fingerprint_of, render, structure_fingerprint, write_config
from .runtime import MasterCLI, RuntimeAPI

log = logging.getLogger("meshkit.haproxy.sync")

DEBOUNCE = 0.05  # seconds to gather a burst of registry changes into one round
READY_TIMEOUT = 10.0  # seconds a new worker may take to answer on the stats socket
CANCEL_WAIT = 1.0  # seconds a cancelled round may take to end before the stop goes on without it
REGISTRY_CLOSE_TIMEOUT = 2.0  # seconds closing the registry may take at stop (alongside stopping HAProxy)


class HAProxySync:
    """Keeps one HAProxy's frontends, backends and servers in step with the registry.

    ``run`` returns soon after :meth:`request_stop` (see the module doc for
    the bound); an owned HAProxy is then stopped, softly if it allows.
    ``config`` may be replaced while running with :meth:`set_config` (the next
    round reloads HAProxy if the structure changed).
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.config = config
        self.paths = paths
        self.attach = attach
        self.haproxy = haproxy or find_haproxy()
        self.source = source
        self.clock = clock
        self.registry = Registry(settings)
        self.runtime = RuntimeAPI(paths.stats_socket)
        self.master = MasterCLI(paths.master_socket)
        self.process: HAProxyProcess | None = None
        if not attach:
            self.process = HAProxyProcess(paths.config_file, paths.master_socket, paths.pid_file,
                                          self.haproxy, config.inherited_fds)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._loaded: str | None = None  # structure fingerprint of the configuration HAProxy runs
        self._rejected: str | None = None  # structure fingerprint haproxy -c refused (not retried)
        self._retry_after = 0.0  # clock time before which no launch / reload is tried again
        self._launch_backoff = 0.5
        self._problems: set[str] = set()
        self._failing: dict[str, str] = {}  # step -> HAProxy's last refusal, to log each refusal once
        self._unreachable_since: float | None = None
        self.hosts = HostCache(clock)
        self.rounds = 0  # completed rounds (for tests and status)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Follow the registry and keep HAProxy in step until :meth:`request_stop`.

        However it ends (a stop, an error, a cancellation), the registry is
        closed and an owned HAProxy stopped before it returns.
        """
        try:
            if self.attach:
                try:
                    self._loaded = fingerprint_of(self.paths.config_file.read_text())
                except OSError:
                    self._loaded = None
            await self._unless_stopped(self.registry.start())
            self.registry.add_listener(self.wake)
            while not self._stopping:
                await self._unless_stopped(self.round())
                await wait_event(self._wake, self.config.reconcile_interval)
                if self._wake.is_set() and not self._stopping:
                    await asyncio.sleep(DEBOUNCE)
                self._wake.clear()
        finally:
            self.registry.remove_listener(self.wake)
            await self._shutdown()

    def request_stop(self) -> None:
        """Make :meth:`run` return, abandoning the current round (safe from a signal handler)."""
        self._stopping = True
        self._stop.set()
        self._wake.set()

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> None:
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
        """Close the registry and stop an owned HAProxy side by side, each within its budget."""
        loop = asyncio.get_running_loop()
        closing = asyncio.ensure_future(self.registry.close())
        close_deadline = loop.time() + REGISTRY_CLOSE_TIMEOUT
        try:
            if self.process is not None:
                await self.process.stop(self.config.stop_timeout)
            await asyncio.wait({closing}, timeout=max(0.0, close_deadline - loop.time()))
        finally:
            if not closing.done():
                log.warning("registry not closed in %.0fs; exiting anyway", REGISTRY_CLOSE_TIMEOUT)
                closing.cancel()
            elif not closing.cancelled() and closing.exception() is not None:
                log.warning("closing the registry failed: %s", closing.exception())

    def wake(self) -> None:
        """Run a round soon (registry listener)."""
        self._wake.set()

    def set_config(self, config: ProxyConfig) -> None:
        """Use a new configuration from the next round on (a reload follows if the structure changed)."""
        if self.process is not None and config.inherited_fds != self.process.pass_fds:
            self.process.pass_fds = config.inherited_fds
        self.config = config
        self._rejected = None
        self.wake()

    # -- one round --------------------------------------------------------------

    async def round(self) -> None:
        """Bring HAProxy in line with the registry once; errors are logged, never raised."""
        try:
            records = self.registry.instances()
            await self.hosts.refresh(listener_hosts(self.config, records))
            model = self.model(records)
            if self.process is not None and not self.process.running():
                await self._launch(model)
                if not self.process.running():
                    return  # waiting to try again (backoff)
            else:
                await self._reload_if_needed(model)
            await self._reconcile(model)
        except HAProxyUnreachableError as exc:
            self._note_unreachable(exc)
        except HAProxyError as exc:
            log.error("%s", exc)
        except Exception:
            # Whatever it was, the next round starts from HAProxy's real state.
            log.exception("haproxy sync round failed")
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
            log.warning("cannot route to %s", problem)
        self._problems = set(model.problems)
        return model

    async def _launch(self, model: Model) -> None:
        assert self.process is not None
        if self._stopping or self.clock() < self._retry_after:
            return
        if self.process.returncode is not None:
            log.error("haproxy master exited with %s; starting it again", self.process.returncode)
        self._loaded = None
        self._retry_after = self.clock() + self._launch_backoff
        self._launch_backoff = min(self._launch_backoff * 2, 10.0)
        fingerprint = await self._write(model)
        self.process.start()
        await self._wait_worker(None)
        self._loaded = fingerprint
        self._retry_after, self._launch_backoff = 0.0, 0.5
        log.info("haproxy is up with %d server(s)", sum(len(b.servers) for b in model.backends))

    async def _reload_if_needed(self, model: Model) -> None:
        fingerprint = structure_fingerprint(model, self.paths)
        if fingerprint in (self._loaded, self._rejected) or self.clock() < self._retry_after:
            return
        log.info("frontends or backends changed: reloading haproxy")
        await self._write(model)
        try:
            table = await self.master.reload()
            await self._wait_worker(table.workers)
        except ReloadError:
            self._retry_after = self.clock() + 5.0  # HAProxy keeps its old worker meanwhile
            raise
        self._loaded = fingerprint
        log.info("haproxy reloaded (worker %s)", ", ".join(map(str, table.workers)))

    async def _write(self, model: Model) -> str:
        """Render ``model`` (every known server included), check it, and write it; return its fingerprint."""
        text = render(model, self.paths, self.source)
        fingerprint = fingerprint_of(text) or ""
        try:
            # Detached: a stop cancels this round without waiting for haproxy -c.
            await detached(functools.partial(check_config, text, model, self.haproxy))
        except ConfigCheckError:
            self._rejected = fingerprint
            raise
        write_config(self.paths.config_file, text)
        return fingerprint

    async def _wait_worker(self, workers: tuple[int, ...] | None) -> None:
        """Wait until the stats socket is answered by one of ``workers`` (by the master's worker if None).

        With ``None`` (a fresh start) the master CLI must answer too: before
        that, the master is still re-executing itself and would lose a signal.
        """
        deadline = self.clock() + READY_TIMEOUT
        while True:
            if self.process is not None and not self.process.running():
                raise HAProxyError(f"haproxy master exited with {self.process.returncode} while starting")
            try:
                if workers is None:
                    workers = (await self.master.processes()).workers or None
                if workers is not None and await self.runtime.worker_pid() in workers:
                    return
            except HAProxyUnreachableError:
                pass
            if self.clock() > deadline:
                raise ReloadError(f"no haproxy worker answered on {self.paths.stats_socket} in {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.05)

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
