"""Talking to ``circusd``: serialised, retried control commands.

Circus 0.19 runs some commands exclusively and answers any other command
that arrives meanwhile with ``"arbiter is already running <cmd> command"``
(or ``"arbiter is restarting..."``) instead of queueing it. A tool that sends
one command and trusts the answer therefore fails or, worse, silently does
nothing (this is how Circus's own flapping plugin loses its ``stop``: it
``cast``s the command and never reads the refusal). :class:`CircusControl`
serialises meshkit's own commands with a lock file and retries refused ones
with backoff until its deadline, so every command either takes effect or
raises :class:`StackError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import Any

from ..errors import MeshError

_CONFLICT_MARKERS = ("already running", "arbiter is restarting")
# Commands that only read: they never conflict in circusd, so they skip the lock.
_READ_ONLY = frozenset({"list", "status", "listsockets", "numprocesses", "numwatchers", "get",
                        "options", "stats", "dstats", "globaloptions"})


class StackError(MeshError):
    """A Circus control command failed or could not be delivered in time."""


class CircusControl:
    """A client for one ``circusd`` control endpoint (``ipc://...``).

    ``lock_path`` names a file used to serialise commands from every meshkit
    process on this host; ``timeout`` bounds each command, retries included.
    """

    def __init__(self, endpoint: str, lock_path: str | None = None, timeout: float = 90.0) -> None:
        self.endpoint = endpoint
        self.lock_path = lock_path
        self.timeout = timeout
        self._held = 0  # depth of exclusive() sessions holding the lock file

    def call(self, command: str, deadline: float | None = None, **properties: Any) -> dict[str, Any]:
        """Send ``command``; retry while Circus is busy; return the reply.

        ``deadline`` (``time.monotonic()`` value) bounds it, retries included;
        by default ``timeout`` s from now. Raises :class:`StackError` if
        circusd does not answer, or answers an error other than "busy", or is
        still busy at the deadline.
        """
        from circus.client import CircusClient
        from circus.exc import CallError as CircusCallError

        if deadline is None:
            deadline = time.monotonic() + self.timeout
        budget = max(0.5, deadline - time.monotonic())
        backoff = 0.05
        with self._lock(command, deadline):
            # A waiting command (stop, scale down) lasts as long as the
            # processes' graceful stop, so the answer may take the whole budget.
            client = CircusClient(endpoint=self.endpoint, timeout=budget)
            try:
                while True:
                    try:
                        reply: dict[str, Any] = client.call({"command": command, "properties": properties})
                    except CircusCallError as exc:
                        raise StackError(f"circusd at {self.endpoint} did not answer {command!r}: {exc}") from None
                    if reply.get("status") == "ok":
                        return reply
                    reason = str(reply.get("reason", reply))
                    if not any(marker in reason for marker in _CONFLICT_MARKERS):
                        raise StackError(f"circus refused {command!r}: {reason}")
                    if time.monotonic() + backoff > deadline:
                        raise StackError(f"circus still busy after {budget:.0f}s: {reason}")
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 0.5)
            finally:
                client.stop()

    def reachable(self) -> bool:
        """Whether circusd answers a cheap command right now."""
        try:
            CircusControl(self.endpoint, None, timeout=2.0).call("list")
        except StackError:
            return False
        return True

    def watchers(self) -> list[str]:
        return [str(w) for w in self.call("list").get("watchers", [])]

    def pids(self, watcher: str) -> list[int]:
        return sorted(int(p) for p in self.call("list", name=watcher).get("pids", []))

    def status(self) -> dict[str, str]:
        """Watcher name → ``active`` / ``stopped`` / ..."""
        return {str(k): str(v) for k, v in self.call("status").get("statuses", {}).items()}

    def numprocesses(self, watcher: str) -> int:
        return int(self.call("numprocesses", name=watcher)["numprocesses"])

    def priority(self, watcher: str) -> int:
        """The watcher's Circus ``priority`` (higher starts earlier)."""
        return int(self.call("get", name=watcher, keys=["priority"]).get("options", {}).get("priority", 0))

    def command_line(self, watcher: str) -> str:
        return str(self.call("get", name=watcher, keys=["cmd"]).get("options", {}).get("cmd", ""))

    def incr(self, watcher: str, count: int, deadline: float | None = None) -> int:
        """Start ``count`` more processes of ``watcher``; return its new number of processes."""
        return int(self.call("incr", deadline, name=watcher, nb=count, waiting=True)["numprocesses"])

    def decr(self, watcher: str, count: int, deadline: float | None = None) -> int:
        """Stop ``count`` processes of ``watcher`` gracefully, *the oldest first* (Circus's
        ``manage_processes`` keeps the newest), and wait; return its new number of processes."""
        return int(self.call("decr", deadline, name=watcher, nb=count, waiting=True)["numprocesses"])

    def scale(self, watcher: str, count: int) -> None:
        """Set the number of processes of ``watcher`` (waits until Circus applied it)."""
        self.call("set", name=watcher, options={"numprocesses": count}, waiting=True)

    def start(self, watcher: str) -> None:
        self.call("start", name=watcher, waiting=True)

    def stop(self, watcher: str, deadline: float | None = None) -> None:
        self.call("stop", deadline, name=watcher, waiting=True)

    def quit(self, deadline: float | None = None) -> None:
        self.call("quit", deadline, waiting=True)

    def sockets(self) -> dict[str, str]:
        """Circus-managed listening sockets: name → ``host:port`` actually bound."""
        reply = self.call("listsockets")
        result: dict[str, str] = {}
        for item in reply.get("sockets", []):
            if isinstance(item, dict) and "name" in item:
                host, port = item.get("host"), item.get("port")
                result[str(item["name"])] = f"{host}:{port}" if port is not None else str(item.get("path"))
        return result

    @contextlib.contextmanager
    def exclusive(self, deadline: float | None = None) -> Iterator[None]:
        """Hold the lock file across several commands (a shutdown, a rolling restart).

        Other meshkit commands that change the stack wait until the block
        ends; this client's own commands inside it do not take the lock again.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        with self._lock("exclusive", deadline):
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1

    @contextlib.contextmanager
    def _lock(self, command: str, deadline: float) -> Iterator[None]:
        """Hold the lock file for commands that change the stack (reads need not wait)."""
        if self.lock_path is None or command in _READ_ONLY or self._held:
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StackError(f"another meshkit command still holds {self.lock_path}") from None
                    time.sleep(0.05)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
