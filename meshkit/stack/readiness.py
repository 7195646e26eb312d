"""When a starting stack is up, and when it has failed: what ``meshkit up`` waits for.

The stack is *up* once circusd answers, every process of every active
service watcher (those that run ``meshkit run``) has a registry record, and
HAProxy answers with every backend ``UP`` (:func:`backends_up`). It has
*failed* as soon as one of these happens first:

- circusd itself exits (its log says why: :func:`meshkit.stack.circusd.startup_failure`);
- a process of an *awaited* watcher exits (:func:`awaited_watchers`: meshkit's
  own programs and the embedded Redis), heard from circusd's ``reap`` events
  (:mod:`.exits`): none of them may exit while the stack starts, so any exit,
  even with status 0, is a failed start, reported with its status and the end
  of its log. Without this, a service that fails at
  import was restarted by Circus until flap control stopped it, and ``up``
  then declared a stack without that service ready;
- the deadline passes (what was still awaited is named).

A watcher of your own that runs another program is not awaited: flap
control (:mod:`.flap`) looks after it as after any watcher.
"""

from __future__ import annotations

import itertools
import os
import shlex
import socket
import subprocess
import time
from collections import deque

from ..config import Settings
from ..registry import read_records
from .circusd import startup_failure
from .control import StackError
from .exits import Exit, ExitWatch, failure_report
from .stack import Stack

# How long, after the first failure, further exits are collected into the same
# report: with a bad settings file every meshkit program fails within this.
SETTLE = 0.5
HEARD = 100  # exits kept while waiting (a crash-looping watcher of your own is heard too)


def wait_ready(stack: Stack, settings: Settings, proc: subprocess.Popen[bytes], timeout: float,
               stops: list[int], log_offset: int = 0, exits: ExitWatch | None = None) -> None:
    """Wait until the stack is up; raise :class:`StackError` once it has failed (see the module doc).

    ``proc`` is circusd, ``log_offset`` where this run begins in its log,
    ``stops`` the signals received (any one ends the wait), ``exits`` the
    subscriber to circusd's events, connected before circusd was started
    (None: exits are not heard, only the deadline ends a failed start).
    """
    deadline = time.monotonic() + timeout
    last = "circusd to answer"
    heard: deque[Exit] = deque(maxlen=HEARD)
    awaited: set[str] | None = None
    while time.monotonic() < deadline:
        if stops:
            raise StackError("interrupted while starting")
        if proc.poll() is not None:
            raise StackError(_exit_reason(stack, proc.returncode, log_offset))
        if stack.control.reachable():
            if awaited is None:
                awaited = awaited_watchers(stack)
            failed = [e for e in heard if e.watcher in awaited]
            if failed and exits is not None:
                failed += [e for e in exits.exits(SETTLE) if e.watcher in awaited]
                raise StackError(failure_report(failed, stack.watcher_log, "failed as the stack started"))
            missing = _still_missing(stack, settings)
            if not missing:
                return
            last = missing
        if exits is not None:
            heard.extend(exits.exits(0.2))  # also the pause between two looks
        else:
            time.sleep(0.2)
    raise StackError(f"stack not ready after {timeout:.0f}s: waiting for {last}")


def _still_missing(stack: Stack, settings: Settings) -> str:
    """What the stack still lacks to be up, in words; empty once it is up."""
    try:
        missing = _unregistered(stack, settings)
    except Exception as exc:  # Redis not up yet
        missing = [f"registry ({exc})"]
    if not missing and stack.control.status().get("haproxy") == "active" and not _haproxy_answers(stack):
        missing = [f"HAProxy (see {stack.run_dir}/haproxy-sync.log)"]
    return "registration of " + ", ".join(missing) if missing else ""


def _exit_reason(stack: Stack, code: int | None, log_offset: int) -> str:
    log = os.path.join(stack.run_dir, "circusd.log")
    try:
        with open(log, "rb") as f:
            f.seek(log_offset)
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        text = ""
    reason = startup_failure(text)
    if reason is None:
        return f"circusd exited with {code}; see {log} and {stack.run_dir}/circusd.out"
    return f"circusd could not start the stack: {reason}; see {log}"


def _haproxy_answers(stack: Stack) -> bool:
    """Whether HAProxy's stats socket in the run directory answers and every backend has a server up.

    ``meshkit up`` returns only then: a client connecting a moment earlier,
    while the sync was still adding the gateways (or their first health
    check was running), found no server and was closed.
    """
    path = os.path.join(stack.run_dir, "haproxy.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return False
    return backends_up(b"".join(chunks).decode(errors="replace"))


def backends_up(stat_csv: str) -> bool:
    """Whether ``show stat`` output lists at least one backend and every one is ``UP``."""
    lines = stat_csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return False
    header = lines[0][2:].split(",")
    try:
        sv, status = header.index("svname"), header.index("status")
    except ValueError:
        return False
    rows = [line.split(",") for line in lines[1:] if line]
    backends = [row for row in rows if len(row) > max(sv, status) and row[sv] == "BACKEND"]
    return bool(backends) and all(row[status] == "UP" for row in backends)


def _unregistered(stack: Stack, settings: Settings) -> list[str]:
    records = read_records(settings)
    registered = {r.pid for r in records}
    missing = []
    statuses = stack.control.status()
    services = service_watchers(stack)
    for watcher in statuses:
        if statuses[watcher] != "active" or watcher not in services:
            continue
        pids = stack.control.pids(watcher)
        if not pids or any(p not in registered for p in pids):
            missing.append(watcher)
    return missing


def service_watchers(stack: Stack) -> set[str]:
    """Watchers whose processes are meshkit services (they run ``meshkit run``)."""
    return {w for w in stack.control.watchers() if "meshkit run " in stack.control.command_line(w)}


def awaited_watchers(stack: Stack) -> set[str]:
    """Watchers none of whose processes may exit while the stack starts (see the module doc)."""
    return {w for w in stack.control.watchers() if w == "redis" or runs_meshkit(stack.control.command_line(w))}


def runs_meshkit(command: str) -> bool:
    """Whether a watcher's command runs meshkit: ``... -m meshkit VERB ...`` or ``.../meshkit VERB ...``."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    if any(os.path.basename(word) == "meshkit" for word in words[:1]):
        return True
    return any(a == "-m" and b == "meshkit" for a, b in itertools.pairwise(words))
