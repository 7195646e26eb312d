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
are; nothing is removed before the registry has been read once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from ..config import Settings
from ..registry import Registry, wait_event
from .config import ProxyConfig
from .errors import ConfigCheckError, HAProxyError, HAProxyUnreachableError, ReloadError, RuntimeCommandError
from .model import Model, build_model
from .process import HAProxyProcess, find_haproxy
from .reconcile import REMOVE, plan
from .render import RuntimePaths, check_config, fingerprint_of, render, structure_fingerprint, write_config
from .runtime import MasterCLI, RuntimeAPI

log = logging.getLogger("meshkit.haproxy.sync")

DEBOUNCE = 0.05  # seconds to gather a burst of registry changes into one round
READY_TIMEOUT = 10.0  # seconds a new worker may take to answer on the stats socket
RESOLVE_TTL = 30.0  # seconds a resolved host name is trusted


class HAProxySync:
    """Keeps one HAProxy's frontends, backends and servers in step with the registry.

    ``run`` returns after :meth:`request_stop`; an owned HAProxy is then stopped
    softly. ``config`` may be replaced while running with :meth:`set_config`
    (the next round reloads HAProxy if the structure changed).
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
        self._stopping = False
        self._loaded: str | None = None  # structure fingerprint of the configuration HAProxy runs
        self._rejected: str | None = None  # structure fingerprint haproxy -c refused (not retried)
        self._retry_after = 0.0  # clock time before which no launch / reload is tried again
        self._launch_backoff = 0.5
        self._problems: set[str] = set()
        self._failing: dict[str, str] = {}  # step -> HAProxy's last refusal, to log each refusal once
        self._unreachable_since: float | None = None
        self._resolved: dict[str, tuple[str, float]] = {}
        self.rounds = 0  # completed rounds (for tests and status)

    # -- lifecycle ------------------------------------------------------------

    async def run(self) -> None:
        """Follow the registry and keep HAProxy in step until :meth:`request_stop`."""
        if self.attach:
            try:
                self._loaded = fingerprint_of(self.paths.config_file.read_text())
            except OSError:
                self._loaded = None
        await self.registry.start()
        self.registry.add_listener(self.wake)
        try:
            while not self._stopping:
                await self.round()
                await wait_event(self._wake, self.config.reconcile_interval)
                if self._wake.is_set() and not self._stopping:
                    await asyncio.sleep(DEBOUNCE)
                self._wake.clear()
        finally:
            self.registry.remove_listener(self.wake)
            await self.registry.close()
            if self.process is not None:
                await self.process.stop(self.config.stop_timeout)

    def request_stop(self) -> None:
        """Make :meth:`run` return after the current round (safe from a signal handler)."""
        self._stopping = True
        self._wake.set()

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
        model = self.model()
        try:
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

    def model(self) -> Model:
        """The model for the registry's current view (logs records that cannot become servers)."""
        model = build_model(self.config, self.registry.instances(), self._resolve)
        for problem in set(model.problems) - self._problems:
            log.warning("cannot route to %s", problem)
        self._problems = set(model.problems)
        return model

    async def _launch(self, model: Model) -> None:
        assert self.process is not None
        if self.clock() < self._retry_after:
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
            await asyncio.to_thread(check_config, text, model, self.haproxy)
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
        backends = set((await self.runtime.execute("show backend")).split())
        # Only backends HAProxy has: a structure haproxy -c refused is not loaded.
        live = [b for b in model.backends if b.name in backends]
        steps = plan(replace(model, backends=tuple(live)), actual, remove=self.registry.synced)
        for step in steps:
            for command in step.commands:
                try:
                    await self.runtime.command(command)
                except RuntimeCommandError as exc:
                    if step.action == REMOVE and command.startswith("del server"):
                        # Its sessions are being shut down; try again shortly.
                        log.debug("cannot delete %s yet: %s", step, exc.reply)
                        asyncio.get_running_loop().call_later(0.2, self.wake)
                    elif self._failing.get(str(step)) != exc.reply:
                        # Logged once; the same failure every round stays at debug level.
                        self._failing[str(step)] = exc.reply
                        log.warning("%s failed at %r: %s", step, command, exc.reply)
                    else:
                        log.debug("%s still fails at %r: %s", step, command, exc.reply)
                    break
            else:
                self._failing.pop(str(step), None)
                log.info("%s%s", step, f" ({step.instance})" if step.instance else "")

    def _note_unreachable(self, exc: HAProxyUnreachableError) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = self.clock()
            log.warning("haproxy does not answer (retrying): %s", exc)
        else:
            log.debug("haproxy still does not answer: %s", exc)

    def _resolve(self, host: str) -> str:
        """``host`` as an IP address (HAProxy reports addresses; names would never compare equal)."""
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        now = self.clock()
        cached = self._resolved.get(host)
        if cached is not None and cached[1] > now:
            return cached[0]
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        # IPv4 first: "localhost" often lists ::1 first, where a gateway bound
        # to 127.0.0.1 does not listen.
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        address = str(infos[0][4][0])
        self._resolved[host] = (address, now + RESOLVE_TTL)
        return address
