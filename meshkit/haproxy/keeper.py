"""The keeper of the HAProxy a sync drives: a master that can serve the model, running its structure.

:class:`MasterKeeper` is steps 1 and 2 of a sync round (see
:mod:`meshkit.haproxy.sync`):

1. **Attach, or start one** (:meth:`MasterKeeper.ensure_master`): keep the
   master of the run directory it drives (:mod:`meshkit.haproxy.process`),
   attach to the one running there, or start one from a configuration
   listing every known server, with a doubling back-off between failed
   launches. A master lacking a listening socket the configuration binds by
   ``fd@N`` is taken over (the new master gets the running one's listeners
   through ``-x``, then the old one is soft-stopped and *retired*: signalled
   again every round until it is gone). A driven HAProxy someone else runs
   (``attach=True``, no process) is never started.
2. **Structure** (:meth:`MasterKeeper.reload_if_needed`): when the
   frontends or backends change, render the configuration with every known
   server, check it with ``haproxy -c`` (a refused structure is not tried
   again until the configuration changes), write it and reload through the
   master CLI. :attr:`MasterKeeper.loaded` is the structure fingerprint of
   what HAProxy runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

from .config import ProxyConfig
from .errors import ConfigCheckError, HAProxyError, HAProxyUnreachableError, ReloadError
from .hosts import detached
from .model import Model
from .process import HAProxyMaster, alive
from .render import RuntimePaths, check_config, fingerprint_of, render, structure_fingerprint, write_config
from .runtime import MasterCLI, RuntimeAPI, wait_for_worker

log = logging.getLogger("meshkit.haproxy.sync")

READY_TIMEOUT = 10.0  # seconds a new worker may take to answer on the stats socket


class MasterKeeper:
    """Keeps the master a sync drives and the structure it has loaded (see the module doc).

    ``runtime`` and ``master`` are the runtime API and master CLI clients;
    ``stopping()`` says whether the sync is stopping (no launch then);
    ``clock`` drives the back-offs.
    """

    def __init__(self, config: ProxyConfig, paths: RuntimePaths, runtime: RuntimeAPI, master: MasterCLI,
                 haproxy: str, source: str, attach: bool, clock: Callable[[], float],
                 stopping: Callable[[], bool]) -> None:
        self.config = config
        self.paths = paths
        self.runtime = runtime
        self.master = master
        self.haproxy = haproxy
        self.source = source
        self.clock = clock
        self.stopping = stopping
        self.process: HAProxyMaster | None = None
        if not attach:
            self.process = HAProxyMaster(paths.config_file, paths.master_socket, paths.pid_file,
                                         paths.stats_socket, haproxy, config.inherited_fds)
        self.loaded: str | None = None  # structure fingerprint of the configuration HAProxy runs
        self._rejected: str | None = None  # structure fingerprint haproxy -c refused (not retried)
        self._retry_after = 0.0  # clock time before which no launch / reload is tried again
        self._launch_backoff = 0.5
        self._retiring: set[int] = set()  # older masters soft-stopped after a takeover, until gone

    def set_config(self, config: ProxyConfig) -> None:
        """Use ``config`` from now on; a structure refused before may be tried again."""
        if self.process is not None:
            self.process.pass_fds = config.inherited_fds
        self.config = config
        self._rejected = None

    async def ensure_master(self, model: Model) -> bool:
        """Make sure a master that can serve ``model`` runs: keep ours, attach to one, or start one.

        Returns whether one runs (False while a launch waits for its back-off).
        """
        assert self.process is not None
        for pid in [p for p in self._retiring if not alive(p)]:
            self._retiring.discard(pid)
        for pid in self._retiring:
            self.process.retire(pid)  # again: a master re-executing itself drops the signal
        if self.process.running():
            assert self.process.pid is not None
            if self.process.can_adopt(self.process.pid):
                return True
            log.warning("haproxy master %d lacks a listening socket the configuration binds; replacing it",
                        self.process.pid)
            await self._launch(model, previous=self.process.pid)
            return self.process.running()
        worker = None
        with contextlib.suppress(HAProxyUnreachableError):
            worker = await self.runtime.worker_pid()
        found = self.process.choose(worker)
        if found is not None and self.process.can_adopt(found):
            self.process.adopt(found)
            self.loaded = self.running_fingerprint()
            log.info("attached to the running haproxy master (pid %d)", found)
            for stale in self.process.others():  # a takeover cut short leaves a second one
                self._retiring.add(stale)
                self.process.retire(stale)
            return True
        await self._launch(model, previous=found)
        return self.process.running()

    def running_fingerprint(self) -> str | None:
        """The structure fingerprint of what HAProxy runs (see :meth:`HAProxyMaster.loaded_structure`).

        An HAProxy someone else started (``attach=True``) has only its configuration file's.
        """
        if self.process is not None:
            return self.process.loaded_structure()
        with contextlib.suppress(OSError):
            return fingerprint_of(self.paths.config_file.read_text())
        return None

    def _note_loaded(self, fingerprint: str) -> None:
        self.loaded = fingerprint
        if self.process is not None:
            self.process.note_loaded(fingerprint)

    async def _launch(self, model: Model, previous: int | None) -> None:
        """Start a master with every server; taking the listeners over from master ``previous`` if given."""
        assert self.process is not None
        if self.stopping() or self.clock() < self._retry_after:
            return
        if self.process.died is not None:
            log.error("haproxy master %d is gone; starting a new one with every server", self.process.died)
            self.process.died = None
        self.loaded = None
        self._retry_after = self.clock() + self._launch_backoff
        self._launch_backoff = min(self._launch_backoff * 2, 10.0)
        fingerprint = await self._write(model)
        # -x only from a worker that answers: a stale socket would fail the start.
        takeover = previous is not None and await self.runtime.answers()
        try:
            await self.process.start(takeover=takeover)
            await self._wait_worker(None)
        except BaseException:
            if previous is not None and alive(previous):
                self.process.fall_back(previous)  # it keeps serving; a later round tries again
            raise
        if previous is not None:
            self._retiring.add(previous)
            self.process.retire(previous)
        self._note_loaded(fingerprint)
        self._retry_after, self._launch_backoff = 0.0, 0.5
        log.info("haproxy is up with %d server(s)", sum(len(b.servers) for b in model.backends))

    async def reload_if_needed(self, model: Model) -> None:
        """Reload HAProxy if ``model``'s structure is not the one it runs (nor one ``haproxy -c`` refused)."""
        fingerprint = structure_fingerprint(model, self.paths)
        if fingerprint in (self.loaded, self._rejected) or self.clock() < self._retry_after:
            return
        log.info("frontends or backends changed: reloading haproxy")
        await self._write(model)
        try:
            table = await self.master.reload()
            await self._wait_worker(table.workers)
        except ReloadError:
            self._retry_after = self.clock() + 5.0  # HAProxy keeps its old worker meanwhile
            raise
        self._note_loaded(fingerprint)
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
        """Wait until the stats socket is answered by one of ``workers`` (by the new master's worker if None)."""
        master = self.process

        def check_alive() -> None:
            if master is not None and not master.running():
                raise HAProxyError(f"haproxy master {master.died} exited while starting (see {master.log_file})")

        await wait_for_worker(self.master, self.runtime, workers, master.pid if master else None,
                              check_alive, READY_TIMEOUT)
