"""Operator commands for the Circus stack: ``meshkit up|down|status|scale|start|stop``.

``up``      starts ``circusd`` on ``circus.ini`` with the run directory and
            variables the file expects, waits until the stack answers, and
            either stays in the foreground (Ctrl-C stops everything) or, with
            ``--daemon``, returns.
``down``    asks circusd to quit (every watcher stops gracefully) and waits.
``status``  one table: Circus's processes joined with the registry's
            instances by pid, plus flap-control stops and public sockets.
``scale``   sets a watcher's number of processes.
``start`` / ``stop``  a watcher (``start`` also clears a flap-control stop).

Every command goes through :class:`CircusControl`, so they serialise with
each other and retry while circusd is busy instead of failing.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from ..config import Settings
from ..registry import read_records
from .control import CircusControl, StackError
from .flap import FlapGuard, FlapLimit, FlapPolicy, read_flapped
from .processes import stack_processes, terminate

DEFAULT_STRATUM_PORT = "3333"


def add_commands(sub: Any) -> None:
    """Register the stack commands on the ``meshkit`` argument parser."""
    up = sub.add_parser("up", help="start the stack from circus.ini")
    up.add_argument("--circus-ini", default="circus.ini")
    up.add_argument("--daemon", action="store_true", help="return once the stack is up")
    up.add_argument("--run-dir", help="default: $MESHKIT_RUN_DIR or .run")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the stack")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the stack gracefully")
    down.add_argument("--run-dir")
    down.add_argument("--timeout", type=float, default=120.0)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="Circus processes joined with registry instances")
    status.add_argument("--run-dir")
    status.set_defaults(func=cmd_status)

    scale = sub.add_parser("scale", help="set a watcher's number of processes")
    scale.add_argument("service")
    scale.add_argument("count", type=int)
    scale.add_argument("--run-dir")
    scale.set_defaults(func=cmd_scale)

    for verb in ("start", "stop"):
        p = sub.add_parser(verb, help=f"{verb} a watcher")
        p.add_argument("service")
        p.add_argument("--run-dir")
        p.set_defaults(func=cmd_start if verb == "start" else cmd_stop)

    guard = sub.add_parser("flapguard", help="(run by circus.ini) stop crash-looping watchers")
    guard.add_argument("--run-dir")
    guard.add_argument("--max-restarts", type=int, default=5)
    guard.add_argument("--window", type=float, default=10.0)
    guard.set_defaults(func=cmd_flapguard)


class Stack:
    """Paths and the control client of one run directory."""

    def __init__(self, settings: Settings, run_dir: str | None = None) -> None:
        self.settings = settings
        self.run_dir = os.path.abspath(run_dir or settings.run_dir)
        self.endpoint = f"ipc://{self.run_dir}/circus.sock"
        self.pidfile = os.path.join(self.run_dir, "circusd.pid")
        self.control = CircusControl(self.endpoint, os.path.join(self.run_dir, "control.lock"))

    def circusd_pid(self) -> int | None:
        try:
            pid = int(Path(self.pidfile).read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(getattr(args, "config", None))


def stack_env(settings: Settings, run_dir: str, home: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment ``circus.ini`` expects (see its header)."""
    env = dict(environ)
    env["MESHKIT_RUN_DIR"] = run_dir
    env["MESHKIT_HOME"] = home
    env["MESHKIT_PYTHON"] = sys.executable
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", ""),
                                   "/usr/local/sbin", "/usr/sbin", "/sbin"])
    if environ.get("MESHKIT_REDIS_URL"):
        env["MESHKIT_EMBEDDED_REDIS"] = "false"
    else:
        env["MESHKIT_EMBEDDED_REDIS"] = "true"
        env["MESHKIT_REDIS_URL"] = f"unix://{run_dir}/redis.sock"
    config = os.path.join(home, "configs", "meshkit.toml")
    if os.path.exists(config):
        env.setdefault("MESHKIT_CONFIG", config)
    env.setdefault("MESHKIT_NAMESPACE", settings.namespace)
    # Loopback unless told otherwise: a demo should not listen on every interface.
    env.setdefault("MESHKIT_STRATUM_HOST", "127.0.0.1")
    env.setdefault("MESHKIT_STRATUM_PORT", DEFAULT_STRATUM_PORT)
    host, _, port = settings.statsd_address.rpartition(":")
    env.setdefault("MESHKIT_STATSD_HOST", host or "127.0.0.1")
    env.setdefault("MESHKIT_STATSD_PORT", port or "8125")
    env.setdefault("MESHKIT_LOG_FORMAT", settings.log_format)
    return env


def cmd_up(args: argparse.Namespace) -> int:
    ini = os.path.abspath(args.circus_ini)
    if not os.path.exists(ini):
        raise StackError(f"{ini} not found (run from the project directory or pass --circus-ini)")
    run_dir = os.path.abspath(args.run_dir or os.environ.get("MESHKIT_RUN_DIR") or ".run")
    os.makedirs(run_dir, exist_ok=True)
    # The project directory (services/, configs/, haproxy/) is the ini's own,
    # unless MESHKIT_HOME says otherwise (a test running a modified copy).
    home = os.environ.get("MESHKIT_HOME") or os.path.dirname(ini)
    env = stack_env(_settings(args), run_dir, home, dict(os.environ))
    settings = Settings.load(getattr(args, "config", None), env=env)
    stack = Stack(settings, run_dir)
    if stack.circusd_pid() is not None:
        raise StackError(f"a stack is already running from {run_dir} (pid {stack.circusd_pid()})")
    command = [sys.executable, "-c", "from circus.circusd import main; main()", ini]
    if args.daemon:
        command.append("--daemon")
    # A session of its own: Ctrl-C reaches this process only, which stops the
    # stack through circusd's control socket (retried while circusd is busy,
    # unlike circusd's own SIGINT handling, whose quit can be refused).
    proc = subprocess.Popen(command, env=env, cwd=home, start_new_session=True)
    stops: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    try:
        _wait_ready(stack, settings, proc if not args.daemon else None, args.timeout, stops)
    except BaseException:
        _stop(stack, proc.pid if not args.daemon else stack.circusd_pid(), stops, graceful=not stops)
        raise
    _print_welcome(stack, settings)
    if args.daemon:
        return 0
    while proc.poll() is None and not stops:
        time.sleep(0.2)
    if proc.poll() is None:
        print("\nstopping the stack gracefully (Ctrl-C again to force)...", file=sys.stderr, flush=True)
        _stop(stack, proc.pid, stops, graceful=True)
    return 0


def _stop(stack: Stack, circusd_pid: int | None, stops: list[int], graceful: bool, timeout: float = 120.0) -> None:
    """Stop the stack: ``quit`` through circusd, or (forced, or if that fails) kill every process of it.

    A signal arriving in ``stops`` after the graceful stop began forces it.
    """
    tree = stack_processes(stack.run_dir, circusd_pid)
    if graceful and circusd_pid is not None:
        seen = len(stops)
        quitting = threading.Thread(target=_quit_quietly, args=(stack,), daemon=True)
        quitting.start()
        deadline = time.monotonic() + timeout
        while _running(circusd_pid) and len(stops) == seen and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(stops) == seen:
            _stop_haproxy(stack)
    # Whatever is left (all of it when forced): including anything Circus
    # started meanwhile, and processes orphaned if circusd itself died.
    alive = circusd_pid is not None and _running(circusd_pid)
    current = {p.pid: p for p in stack_processes(stack.run_dir, circusd_pid if alive else None)}
    tree = [p for p in [*tree, *current.values()] if p.is_running()]
    survivors = terminate(list({p.pid: p for p in tree}.values()), grace=5.0)
    if survivors:
        raise StackError(f"could not stop {len(survivors)} processes: {[p.pid for p in survivors]}")


def _stop_haproxy(stack: Stack) -> None:
    """Stop HAProxy softly: it is no watcher (it outlives its sync process), so quitting circusd leaves it."""
    from ..haproxy.process import stop_haproxy

    try:
        stop_haproxy(stack.run_dir)  # within its stop_timeout + 1 s; what is left, the sweep below ends
    except Exception as exc:  # the sweep after this stops it anyway
        print(f"could not stop haproxy softly: {exc}", file=sys.stderr)


def _quit_quietly(stack: Stack) -> None:
    try:
        stack.control.quit()
    except StackError as exc:
        print(f"circusd did not take the quit command: {exc}", file=sys.stderr)


def _running(pid: int) -> bool:
    """Alive and not a zombie (circusd is our child in the foreground: it stays a zombie until reaped)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_ready(stack: Stack, settings: Settings, proc: subprocess.Popen[bytes] | None,
                timeout: float, stops: list[int]) -> None:
    """Wait until circusd answers, HAProxy answers, and every active watcher's processes registered."""
    deadline = time.monotonic() + timeout
    last = "circusd to answer"
    while time.monotonic() < deadline:
        if stops:
            raise StackError("interrupted while starting")
        if proc is not None and proc.poll() is not None:
            raise StackError(f"circusd exited with {proc.returncode}; see {stack.run_dir}/circusd.log")
        if stack.control.reachable():
            try:
                missing = _unregistered(stack, settings)
            except Exception as exc:  # Redis not up yet
                missing = [f"registry ({exc})"]
            if not missing and stack.control.status().get("haproxy") == "active" and not _haproxy_answers(stack):
                missing = [f"HAProxy (see {stack.run_dir}/haproxy-sync.log)"]
            if not missing:
                return
            last = "registration of " + ", ".join(missing)
        time.sleep(0.2)
    raise StackError(f"stack not ready after {timeout:.0f}s: waiting for {last}")


def _haproxy_answers(stack: Stack) -> bool:
    """Whether HAProxy's stats socket in the run directory answers ``show info``."""
    path = os.path.join(stack.run_dir, "haproxy.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(b"show info\n")
            return bool(b"Name: HAProxy" in sock.recv(4096))
    except OSError:
        return False


def _unregistered(stack: Stack, settings: Settings) -> list[str]:
    records = read_records(settings)
    registered = {r.pid for r in records}
    missing = []
    statuses = stack.control.status()
    for watcher in statuses:
        if statuses[watcher] != "active" or watcher not in _service_watchers(stack):
            continue
        pids = stack.control.pids(watcher)
        if not pids or any(p not in registered for p in pids):
            missing.append(watcher)
    return missing


def _service_watchers(stack: Stack) -> set[str]:
    """Watchers whose processes are meshkit services (they run ``meshkit run``)."""
    result = set()
    for watcher in stack.control.watchers():
        options = stack.control.call("get", name=watcher, keys=["cmd"]).get("options", {})
        if "meshkit run " in str(options.get("cmd", "")):
            result.add(watcher)
    return result


def _print_welcome(stack: Stack, settings: Settings) -> None:
    sockets = stack.control.sockets()
    stratum = sockets.get("stratum", "?")
    port = stratum.rsplit(":", 1)[-1]
    print(
        f"\nmeshkit stack is up (run dir {stack.run_dir}).\n"
        f"  Stratum-style clients connect to port {port}, for example:\n"
        f"    nc 127.0.0.1 {port}\n"
        '    {"id":1,"method":"shares.login","params":["alice"]}\n'
        '    {"id":2,"method":"mesh.subscribe","params":["jobs.*"]}\n'
        '    {"id":3,"method":"shares.submit","params":["<job_id from jobs.notify>","00c0ffee"]}\n'
        '    {"id":4,"method":"shares.stats"}\n'
        f"  In another shell: .venv/bin/meshkit status | ls | scale shares 4 | down\n"
        f"    (with MESHKIT_REDIS_URL={settings.redis_url} MESHKIT_RUN_DIR={stack.run_dir})\n",
        flush=True,
    )


def cmd_down(args: argparse.Namespace) -> int:
    stack = Stack(_settings(args), args.run_dir)
    pid = stack.circusd_pid()
    if pid is None:
        # circusd is gone; its processes may not be (they run in their own sessions).
        _stop_haproxy(stack)
        leftovers = stack_processes(stack.run_dir)
        if not leftovers:
            print("no stack running", file=sys.stderr)
            return 0
        survivors = terminate(leftovers, grace=10.0)
        if survivors:
            raise StackError(f"could not stop {[p.pid for p in survivors]}")
        print(f"circusd was not running; stopped {len(leftovers)} leftover processes")
        return 0
    stack.control.timeout = args.timeout
    _stop(stack, pid, [], graceful=True, timeout=args.timeout)
    print("stack stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..cli import format_table

    settings = _settings(args)
    stack = Stack(settings, args.run_dir)
    try:
        records = {r.pid: r for r in read_records(settings)}
    except Exception as exc:
        print(f"registry unreachable: {exc}", file=sys.stderr)
        records = {}
    flapped = read_flapped(stack.run_dir)
    rows = [("WATCHER", "STATUS", "PID", "SERVICE", "INSTANCE", "ENDPOINT", "STATE", "LISTENERS")]
    now = time.time()
    for watcher, state in sorted(stack.control.status().items()):
        if watcher in flapped:
            state = f"stopped (flapping, {now - float(flapped[watcher]['at']):.0f}s ago)"
        pids = stack.control.pids(watcher) if state == "active" else []
        if not pids:
            rows.append((watcher, state, "-", "-", "-", "-", "-", "-"))
        for pid in pids:
            rec = records.get(pid)
            if rec is None:
                rows.append((watcher, state, str(pid), "-", "-", "-", "-", "-"))
            else:
                listeners = ",".join(f"{k}={v}" for k, v in rec.listeners.items()) or "-"
                rows.append((watcher, state, str(pid), rec.service, rec.instance_id, rec.endpoint,
                             rec.state, listeners))
    print(format_table(rows))
    sockets = stack.control.sockets()
    if sockets:
        print("\npublic sockets: " + ", ".join(f"{k}={v}" for k, v in sorted(sockets.items())))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise StackError("count must be >= 0")
    stack = Stack(_settings(args), args.run_dir)
    stack.control.scale(args.service, args.count)
    print(f"{args.service}: {stack.control.numprocesses(args.service)} processes")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    Stack(_settings(args), args.run_dir).control.start(args.service)
    print(f"{args.service} started")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    Stack(_settings(args), args.run_dir).control.stop(args.service)
    print(f"{args.service} stopped")
    return 0


def cmd_flapguard(args: argparse.Namespace) -> int:
    from ..logs import configure_logging
    from ..metrics import Metrics

    settings = _settings(args)
    stack = Stack(settings, args.run_dir)
    configure_logging(settings, "flapguard", str(os.getpid()))
    policy = FlapPolicy.from_settings(settings, FlapLimit(args.max_restarts, args.window))
    guard = FlapGuard(stack.control, f"ipc://{stack.run_dir}/circus-pubsub.sock", policy,
                      stack.run_dir, Metrics.from_settings(settings, "flapguard"))
    guard.run()
    return 0
