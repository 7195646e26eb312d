"""Starting and stopping a whole stack: ``meshkit up`` and ``meshkit down``.

``up`` starts circusd (:mod:`.circusd`) on ``circus.ini`` in a session of its
own, with no terminal: its stdin is ``/dev/null`` and its output goes to
``<run_dir>/circusd.out``, so nothing in the stack depends on the terminal or
pipe that ``meshkit up`` writes to. It waits until the stack is up
(:mod:`.readiness`; a service that exits meanwhile fails the start at once,
and the stack is stopped again) and either returns (``--daemon``) or stays in the foreground until Ctrl-C,
SIGTERM or SIGHUP, then stops the stack. Stopping never depends on being
able to print (:mod:`.console`): a reader that went away or a closed terminal
cannot keep the stack running.

A graceful stop goes watcher by watcher in :mod:`.order` (the public side
first, Redis last), then quits circusd; a second signal, a failed command or
the deadline turns it into a forced one: every process of the stack
(:func:`.processes.stack_processes`) gets SIGTERM, then SIGKILL after 5 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil

from ..config import Settings
from ..haproxy.process import stop_haproxy
from ..panelurl import wait_for_url
from ..untrusted import clip
from .console import say
from .control import StackError
from .exits import ExitWatch
from .order import stop_in_order
from .processes import stack_processes, terminate
from .readiness import wait_ready
from .stack import Stack


def launch(stack: Stack, ini: str, env: dict[str, str], home: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start circusd on ``ini``; return it and the offset in ``circusd.log`` where this run begins."""
    log = os.path.join(stack.run_dir, "circusd.log")
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    command = [sys.executable, "-m", "meshkit.stack.circusd", ini]
    with open(os.path.join(stack.run_dir, "circusd.out"), "ab") as out:
        # A session of its own: Ctrl-C reaches `meshkit up` only, which stops
        # the stack in order through circusd's control socket.
        proc = subprocess.Popen(command, env=env, cwd=home, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    return proc, offset


def run_up(stack: Stack, settings: Settings, ini: str, env: dict[str, str], home: str,
           daemon: bool, timeout: float) -> int:
    """``meshkit up`` once the environment is known (see the module doc)."""
    stops: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    # Subscribed before circusd starts, so the first exit of a failing service is heard.
    with ExitWatch(stack.pubsub_endpoint) as exits:
        proc, log_offset = launch(stack, ini, env, home)
        try:
            wait_ready(stack, settings, proc, timeout, stops, log_offset, exits)
            welcome(stack, settings)
        except BaseException:
            stop(stack, proc.pid, stops, graceful=not stops)
            raise
    if daemon:
        return 0
    while proc.poll() is None and not stops:
        time.sleep(0.2)
    if proc.poll() is None:
        say("\nstopping the stack gracefully (Ctrl-C again to force)...")
        stop(stack, proc.pid, stops, graceful=True, report=say)
        say("stack stopped")
    return 0


def stop(stack: Stack, circusd_pid: int | None, stops: list[int], graceful: bool, timeout: float = 120.0,
         report: Callable[[str], object] | None = None) -> None:
    """Stop the stack: in order through circusd, or (forced, or if that fails) kill every process of it.

    A signal arriving in ``stops`` after the graceful stop began forces it.
    ``report(line)``, if given, hears of each watcher as it begins to stop,
    and of how long it took if that was a second or more (a gateway's drain
    can take most of a minute: the operator sees what is being waited for).
    Raises :class:`StackError` only if processes survive even SIGKILL.
    """
    tree = stack_processes(stack.run_dir, circusd_pid)
    if graceful and circusd_pid is not None:
        seen = len(stops)
        failures: list[str] = []
        stopping = threading.Thread(target=_stop_in_order, args=(stack, timeout, failures, report), daemon=True)
        stopping.start()
        deadline = time.monotonic() + timeout + 5
        while (_running(circusd_pid) and stopping.is_alive() and len(stops) == seen
               and time.monotonic() < deadline):
            time.sleep(0.1)
        if not stopping.is_alive() and _running(circusd_pid) and not failures:
            # Everything stopped and quit was answered: circusd exits in a moment.
            _wait_exit(circusd_pid, 10.0)
        for failure in failures:
            say(f"stopping the stack in order failed ({failure}); stopping what is left")
        if len(stops) == seen:
            stop_proxy(stack)  # idempotent: also when the haproxy watcher was stopped already
    # Whatever is left (all of it when forced): including anything Circus
    # started meanwhile, and processes orphaned if circusd itself died.
    alive = circusd_pid is not None and _running(circusd_pid)
    current = {p.pid: p for p in stack_processes(stack.run_dir, circusd_pid if alive else None)}
    tree = [p for p in [*tree, *current.values()] if p.is_running()]
    survivors = terminate(list({p.pid: p for p in tree}.values()), grace=5.0)
    if survivors:
        raise StackError(f"could not stop {len(survivors)} processes: {[p.pid for p in survivors]}")


def _stop_in_order(stack: Stack, timeout: float, failures: list[str],
                   report: Callable[[str], object] | None) -> None:
    began: dict[str, float] = {}

    def on_stop(watcher: str) -> None:
        began[watcher] = time.monotonic()
        if report is not None:
            report(f"  stopping {watcher}")

    def after_stop(watcher: str) -> None:
        if watcher == "haproxy":
            stop_proxy(stack)
        took = time.monotonic() - began.get(watcher, time.monotonic())
        if report is not None and took >= 1.0:  # a quick stop needs no second line
            report(f"  {watcher} stopped after {took:.1f}s")

    try:
        stop_in_order(stack.control, time.monotonic() + timeout, on_stop=on_stop, after_stop=after_stop)
    except StackError as exc:
        failures.append(str(exc))


def stop_proxy(stack: Stack) -> None:
    """Stop the stack's HAProxy softly (never raises): it is no watcher, so stopping circusd leaves it running."""
    try:
        stop_haproxy(stack.run_dir)  # within its stop timeout + 1 s; what is left, the final sweep ends
    except Exception as exc:
        say(f"could not stop haproxy softly: {clip(exc)}")


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive and not a zombie (circusd is our child in the foreground: it stays a zombie until reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def welcome(stack: Stack, settings: Settings) -> None:
    """What the operator needs to start using the stack (never raises)."""
    sockets = stack.control.sockets()
    stratum = sockets.get("stratum", "?")
    port = stratum.rsplit(":", 1)[-1]
    panel = wait_for_url(stack.run_dir, 5.0) if "panel" in stack.control.watchers() else None
    say(
        f"\nmeshkit stack is up (run dir {stack.run_dir}; logs in it).\n"
        f"  A Stratum v1 pool listens on port {port}; mine on it with:\n"
        f"    .venv/bin/python -m services.stratum.miner 127.0.0.1 {port}\n"
        "  or by hand:\n"
        f"    nc 127.0.0.1 {port}\n"
        '    {"id":1,"method":"mining.subscribe","params":["nc"]}\n'
        '    {"id":2,"method":"mining.authorize","params":["alice","x"]}\n'
        '    {"id":3,"method":"mining.stats","params":[]}\n'
        "  In another shell, from this directory, any of:\n"
        + ("" if stack.run_dir == os.path.abspath(".run") else
           f"    export MESHKIT_RUN_DIR={stack.run_dir}   (first: the commands look in ./.run otherwise)\n")
        + "    .venv/bin/meshkit status\n"
        "    .venv/bin/meshkit ls\n"
        "    .venv/bin/meshkit scale mining 4\n"
        "    .venv/bin/meshkit restart mining\n"
        "    .venv/bin/meshkit down\n"
        f"  Your own services join this stack with: export MESHKIT_REDIS_URL={settings.redis_url}\n"
        + (f"  The control panel (loopback; docs/panel.md for an ssh tunnel): {panel}\n" if panel else ""),
        sys.stdout,
    )


def down_leftovers(stack: Stack) -> int:
    """``meshkit down`` when circusd is gone: stop the processes it left (they run in their own sessions)."""
    stop_proxy(stack)
    leftovers = stack_processes(stack.run_dir)
    if not leftovers:
        say("no stack running")
        return 0
    survivors = terminate(leftovers, grace=10.0)
    if survivors:
        raise StackError(f"could not stop {[p.pid for p in survivors]}")
    say(f"circusd was not running; stopped {len(leftovers)} leftover processes", sys.stdout)
    return 0
