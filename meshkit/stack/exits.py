"""Processes of the stack that exit, heard from circusd's event stream, and what their logs end with.

circusd publishes ``watcher.<name>.reap`` on its pub/sub endpoint
(``<run_dir>/circus-pubsub.sock``) each time it reaps a process of a watcher,
with the pid and the exit code (a negative code is the signal that killed
it). Circus itself logs that at debug level only, so this stream is the one
positive signal that a process has gone and why. :class:`ExitWatch`
follows it for ``meshkit up`` (a service that dies as the stack starts is a
failed start, reported at once instead of after the readiness timeout) and
``meshkit restart`` (a replacement that dies before it registers).

Connect an :class:`ExitWatch` *before* the events can happen: ZeroMQ keeps
reconnecting to an ``ipc://`` endpoint that does not exist yet, and a
subscriber hears only what is published after it has joined. (A process
that crashes at once is started again by Circus within ``check_delay``, so
an exit missed while joining is followed by another one.)

:func:`failure_report` words exits for the operator, with the end of each
watcher's log (:func:`log_tail`); every line taken from a log is clipped.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from ..untrusted import clip

# circusd's events are a few hundred bytes; the bounds make what a subscriber
# can hold at most MAX_EVENT * QUEUED_EVENTS bytes (4 MiB) whatever is published.
MAX_EVENT = 16 * 1024
QUEUED_EVENTS = 256
TAIL_LINES = 12
TAIL_BYTES = 64 * 1024
LINE_LIMIT = 200


def watcher_event(frames: list[bytes]) -> tuple[str, dict[str, Any]] | None:
    """One circusd pub/sub message as ``(topic, event)``; ``None`` for one that is not two frames of JSON.

    An event that is JSON but not an object becomes ``{}`` (the topic alone still counts).
    """
    if len(frames) != 2:
        return None
    try:
        data = json.loads(frames[1])
    except ValueError:
        return None
    return frames[0].decode(errors="replace"), data if isinstance(data, dict) else {}


@dataclass(frozen=True, slots=True)
class Exit:
    """One reaped process: its watcher, pid, and exit code (negative: the signal; None: unknown)."""

    watcher: str
    pid: int
    code: int | None

    def status(self) -> str:
        """``exited with status 1``, ``was killed by SIGKILL``, ..."""
        if self.code is None:
            return "exited (status unknown)"
        if self.code < 0:
            try:
                name = signal.Signals(-self.code).name
            except ValueError:
                name = f"signal {-self.code}"
            return f"was killed by {name}"
        return f"exited with status {self.code}"


def reaped(topic: str, data: dict[str, Any]) -> Exit | None:
    """The :class:`Exit` a ``watcher.<name>.reap`` event reports; None for any other event."""
    parts = topic.split(".")
    if len(parts) < 3 or parts[0] != "watcher" or parts[-1] != "reap":
        return None
    pid, code = data.get("process_pid"), data.get("exit_code")
    if type(pid) is not int:
        return None
    return Exit(".".join(parts[1:-1]), pid, code if type(code) is int else None)


class ExitWatch:
    """A subscriber to one circusd's ``reap`` events; a context manager (closing it ends the socket).

    With ``watcher``, only that watcher's exits are heard (and only they
    queue: a long wait between two reads drops nothing that matters).
    """

    def __init__(self, endpoint: str, watcher: str | None = None) -> None:
        self._watcher = watcher
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT)
        self._sub.setsockopt(zmq.RCVHWM, QUEUED_EVENTS)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 20)  # joins a circusd that is just starting sooner
        topic = f"watcher.{watcher}.reap" if watcher is not None else "watcher."
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._sub.connect(endpoint)

    def exits(self, timeout: float = 0.0) -> list[Exit]:
        """What was reaped since the last call, waiting up to ``timeout`` s for the first one."""
        found: list[Exit] = []
        wait_ms = int(timeout * 1000)
        while self._sub.poll(wait_ms):
            wait_ms = 0
            event = watcher_event(self._sub.recv_multipart())
            gone = reaped(*event) if event is not None else None
            if gone is not None and self._watcher in (None, gone.watcher):
                found.append(gone)
        return found

    def of(self, pids: Sequence[int], timeout: float) -> list[Exit]:
        """The exits of ``pids`` (of any process if empty), waiting up to ``timeout`` s until each is heard of."""
        wanted = set(pids)
        found: list[Exit] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            found += [e for e in self.exits(max(0.0, min(left, 0.1))) if not wanted or e.pid in wanted]
            heard = {e.pid for e in found}
            if left <= 0 or (wanted <= heard if wanted else bool(found)):
                return found

    def close(self) -> None:
        self._sub.close()
        self._ctx.term()

    def __enter__(self) -> ExitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-blank lines of the file at ``path`` (from its last 64 KiB), each clipped."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
            text = f.read(TAIL_BYTES).decode(errors="replace")
    except OSError:
        return []
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return [clip(line, LINE_LIMIT) for line in kept[-lines:]]


def failure_report(exits: Sequence[Exit], log_of: Callable[[str], str | None], what: str,
                   watchers: int = 3) -> str:
    """``what`` (e.g. ``failed as the stack started``) for each watcher in ``exits``, with its log's end.

    One paragraph a watcher, at most ``watchers`` of them, the first to exit
    first: the pids and how they exited, then the log that ``log_of(watcher)``
    names (None: no log), indented.
    """
    by_watcher: dict[str, list[Exit]] = {}
    for one in exits:
        by_watcher.setdefault(one.watcher, []).append(one)
    paragraphs = []
    for watcher, gone in list(by_watcher.items())[:watchers]:
        statuses = "; ".join(f"pid {e.pid} {e.status()}" for e in gone[-3:])
        more = f" (and {len(gone) - 3} earlier exits)" if len(gone) > 3 else ""
        text = f"{clip(watcher, 60)} {what}: {statuses}{more}"
        log = log_of(watcher)
        tail = log_tail(log) if log else []
        if tail:
            text += f"; the end of {log}:\n" + "\n".join(f"    {line}" for line in tail)
        elif log:
            text += f" ({log} is empty)"
        paragraphs.append(text)
    left = len(by_watcher) - len(paragraphs)
    if left:
        paragraphs.append(f"and {left} more watchers exited too (see `meshkit status` and their logs)")
    return "\n".join(paragraphs)
