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

    def call(self, command: str, **properties: Any) -> dict[str, Any]:
        """Send ``command``; retry while Circus is busy; return the reply.

        Raises :class:`StackError` if circusd does not answer, or answers an
        error other than "busy", or is still busy at the deadline.
        """
        from circus.client import CircusClient
        from circus.exc import CallError as CircusCallError

        deadline = time.monotonic() + self.timeout
        backoff = 0.05
        with self._lock(command, deadline):
            # A waiting command (stop, scale down) lasts as long as the
            # processes' graceful stop, so the answer may take the whole budget.
            client = CircusClient(endpoint=self.endpoint, timeout=self.timeout)
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
                        raise StackError(f"circus still busy after {self.timeout:.0f}s: {reason}")
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

    def scale(self, watcher: str, count: int) -> None:
        """Set the number of processes of ``watcher`` (waits until Circus applied it)."""
        self.call("set", name=watcher, options={"numprocesses": count}, waiting=True)

    def start(self, watcher: str) -> None:
        self.call("start", name=watcher, waiting=True)

    def stop(self, watcher: str) -> None:
        self.call("stop", name=watcher, waiting=True)

    def quit(self) -> None:
        self.call("quit", waiting=True)

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
    def _lock(self, command: str, deadline: float) -> Iterator[None]:
        """Hold the lock file for commands that change the stack (reads need not wait)."""
        if self.lock_path is None or command in _READ_ONLY:
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
                        raise StackError(f"another meshkit command held {self.lock_path} "
                                         f"for {self.timeout:.0f}s") from None
                    time.sleep(0.05)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
