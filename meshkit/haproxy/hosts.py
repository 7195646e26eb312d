"""Host names in listener addresses turned into IP addresses, without blocking the event loop.

HAProxy reports servers by address, so a server given by name would never
compare equal to what ``show servers state`` says: the sync process resolves
names itself. :class:`HostCache` does that in two halves:

* :meth:`HostCache.refresh` (async) looks up the names that are new or whose
  answer is older than ``ttl``, all at once, each in a daemon thread and
  bounded by ``timeout``. The event loop never waits on the resolver, and a
  resolver that hangs neither delays a stop nor keeps the process alive.
* :meth:`HostCache.lookup` is the :data:`~meshkit.haproxy.model.Resolver`
  given to :func:`~meshkit.haproxy.model.build_model`: it answers from memory
  and never blocks.

A lookup that fails keeps the last good address: a name that fails to
resolve once must not remove a healthy gateway (and so cut its clients). Only
a name never resolved is an error for :meth:`~HostCache.lookup`.

Records usually carry IP addresses, which are used as they are. Only what
the registry grammar (:mod:`meshkit.names`) calls an IP literal counts as
one: :func:`ipaddress.ip_address` alone would take ``fe80::1%x;shutdown
frontend stratum`` for an IPv6 address with a scope id. Names outside the
grammar are never looked up, and :meth:`HostCache.lookup` refuses them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from .. import names
from ..untrusted import clip

log = logging.getLogger("meshkit.haproxy.hosts")

T = TypeVar("T")

TTL = 30.0  # seconds an answer is used before it is looked up again
TIMEOUT = 2.0  # seconds one round of lookups may take


def getaddrinfo_ip(host: str) -> str:
    """The address the system resolver gives for ``host``, IPv4 first (blocking; raises ``OSError``).

    IPv4 first: ``localhost`` often lists ``::1`` first, where a gateway bound
    to 127.0.0.1 does not listen.
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for {host!r}")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


async def detached(func: Callable[[], T]) -> T:
    """Run blocking ``func`` in a new daemon thread and return its result (or raise its exception).

    Unlike ``asyncio.to_thread``, nothing waits for the thread: cancelling the
    caller returns at once, and neither the event loop's shutdown nor the
    interpreter's exit waits for a call that hangs (it is abandoned).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.done():  # done: the caller was cancelled
            future.set_result(result)

    def fail(error: Exception) -> None:
        if not future.done():
            future.set_exception(error)

    def work() -> None:
        try:
            result = func()
        except Exception as exc:
            _call_soon(loop, fail, exc)
        else:
            _call_soon(loop, succeed, result)

    threading.Thread(target=work, name="meshkit-detached", daemon=True).start()
    return await future


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[T], None], arg: T) -> None:
    try:
        loop.call_soon_threadsafe(callback, arg)
    except RuntimeError:
        pass  # the loop closed meanwhile: nobody is waiting any more


@dataclass
class _Entry:
    address: str | None  # last good answer; None if the name never resolved
    expires: float  # clock time after which it is looked up again
    error: str = ""  # why the last lookup failed ("" if it succeeded)


class HostCache:
    """Host names resolved to IP addresses (see the module doc).

    ``resolve`` is the blocking lookup (run in daemon threads); ``clock``
    times the ``ttl``, so tests drive both.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        resolve: Callable[[str], str] = getaddrinfo_ip,
        ttl: float = TTL,
        timeout: float = TIMEOUT,
    ) -> None:
        self.clock = clock
        self.resolve = resolve
        self.ttl = ttl
        self.timeout = timeout
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def is_address(host: str) -> bool:
        """Whether ``host`` is an IP literal of the registry grammar (nothing to resolve)."""
        return names.is_ip_literal(host)

    @staticmethod
    def is_name(host: str) -> bool:
        """Whether ``host`` is a host of the registry grammar that needs resolving."""
        try:
            names.validate_host(host)
        except ValueError:
            return False
        return not names.is_ip_literal(host)

    def lookup(self, host: str) -> str:
        """``host`` as an IP address, from memory: never blocks.

        Raises ``OSError`` for a name that has never resolved (it may still be
        waiting for its first :meth:`refresh`).
        """
        if self.is_address(host):
            return host
        if not self.is_name(host):
            raise OSError(f"not a valid host: {clip(host)!r}")
        entry = self._entries.get(host)
        if entry is None:
            raise OSError(f"{host!r} not resolved yet")
        if entry.address is None:
            raise OSError(entry.error)
        return entry.address

    async def refresh(self, hosts: Iterable[str]) -> None:
        """Look up the names among ``hosts`` that are new or due (resolved more than ``ttl`` ago).

        Lookups run concurrently; one that has not answered ``timeout`` seconds
        after the call counts as failed (its thread is abandoned). A failed
        lookup keeps the previous address, is logged once, and is tried again
        after ``ttl``. Names not in ``hosts`` are forgotten.
        """
        hosts = {h for h in hosts if self.is_name(h)}
        for gone in set(self._entries) - hosts:
            del self._entries[gone]
        now = self.clock()
        due = sorted(h for h in hosts if h not in self._entries or self._entries[h].expires <= now)
        if not due:
            return
        tasks = {host: asyncio.ensure_future(detached(functools.partial(self.resolve, host))) for host in due}
        try:
            await asyncio.wait(tasks.values(), timeout=self.timeout)
        finally:
            for task in tasks.values():
                task.cancel()
        expires = self.clock() + self.ttl
        for host, task in tasks.items():
            old = self._entries.get(host)
            if task.done() and not task.cancelled() and task.exception() is None:
                if old is not None and old.error:
                    log.info("%s resolves again: %s", host, task.result())
                self._entries[host] = _Entry(task.result(), expires)
                continue
            error = self._error(host, task)
            if old is None or old.error != error:
                if old is not None and old.address is not None:
                    log.warning("cannot resolve %s (%s); keeping %s", host, error, old.address)
                else:
                    log.warning("cannot resolve %s: %s", host, error)
            self._entries[host] = _Entry(old.address if old else None, expires, error)

    def _error(self, host: str, task: asyncio.Future[str]) -> str:
        if not task.done() or task.cancelled():
            return f"no answer in {self.timeout:.0f}s"
        exc = task.exception()
        return str(exc) or type(exc).__name__
