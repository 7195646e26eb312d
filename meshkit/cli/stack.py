"""Operator commands for the Circus stack: ``meshkit up|down|status|scale|start|stop|restart``.

``up``      starts ``circusd`` on ``circus.ini`` with the run directory and
            variables the file expects, waits until the stack is up
            (:mod:`meshkit.stack.readiness`: a process that exits meanwhile
            fails it at once), and either stays in the foreground (Ctrl-C
            stops everything) or, with ``--daemon``, returns
            (:mod:`meshkit.stack.lifecycle`).
``down``    stops every watcher in dependency order (:mod:`meshkit.stack.order`), then
            circusd, and waits.
``status``  one table: Circus's processes (with how long each has run)
            joined with the registry's instances by pid (a service's
            process without a record is ``unregistered``), plus flap-control
            stops, public sockets, HAProxy's master and the panel's URL.
``scale``   sets a watcher's number of processes.
``start`` / ``stop``  a watcher (``start`` also clears a flap-control stop).
``restart`` a rolling, graceful restart of a service watcher (:mod:`meshkit.stack.rolling`).

Every command goes through :class:`CircusControl`, so they serialise with
each other and retry while circusd is busy instead of failing. Every command
but ``up`` first checks that a stack runs from the run directory and says so
plainly if none does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import psutil

from ..config import Settings
from ..haproxy.process import haproxy_master
from ..panelurl import read_url
from ..registry import read_records
from ..stack.console import say
from ..stack.control import StackError
from ..stack.exits import ExitWatch, failure_report
from ..stack.flap import (
    DEFAULT_MAX_RESTARTS,
    DEFAULT_WINDOW,
    FlapGuard,
    FlapLimit,
    FlapPolicy,
    read_flapped,
)
from ..stack.lifecycle import down_leftovers, run_up, stop
from ..stack.processes import stack_processes
from ..stack.readiness import service_watchers
from ..stack.rolling import RollingRestart
from ..stack.stack import Stack, stack_env
from ..untrusted import clip
from .output import age, format_table


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

    restart = sub.add_parser("restart", help="rolling graceful restart of a service's processes")
    restart.add_argument("service")
    restart.add_argument("--batch", type=int, default=1, help="processes replaced at a time (default 1)")
    restart.add_argument("--register-timeout", type=float, default=30.0,
                         help="seconds a new process may take to register (default 30)")
    restart.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole restart")
    restart.add_argument("--run-dir")
    restart.set_defaults(func=cmd_restart)

    guard = sub.add_parser("flapguard", help="(run by circus.ini) stop crash-looping watchers")
    guard.add_argument("--run-dir")
    guard.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                       help="abnormal exits a watcher may have within the window "
                            f"(default {DEFAULT_MAX_RESTARTS}; [services.<name>] flap_max_restarts wins)")
    guard.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                       help=f"seconds (default {DEFAULT_WINDOW:g}; [services.<name>] flap_window wins)")
    guard.set_defaults(func=cmd_flapguard)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(getattr(args, "config", None))


def _running_stack(args: argparse.Namespace) -> Stack:
    stack = Stack(_settings(args), args.run_dir)
    stack.require_running()
    return stack


def _stack_with_watcher(args: argparse.Namespace) -> Stack:
    """The running stack, once it is known to have a watcher named ``args.service`` (else :class:`StackError`)."""
    stack = _running_stack(args)
    if args.service not in stack.control.watchers():
        raise StackError(f"no watcher named {clip(args.service, 80)!r} (see `meshkit status`)")
    return stack


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
    leftovers = stack_processes(run_dir)
    if leftovers:
        raise StackError(f"{len(leftovers)} processes of an earlier stack from {run_dir} still run "
                         f"(pids {sorted(p.pid for p in leftovers)}); `meshkit down` stops them")
    return run_up(stack, settings, ini, env, home, args.daemon, args.timeout)


def cmd_down(args: argparse.Namespace) -> int:
    stack = Stack(_settings(args), args.run_dir)
    pid = stack.circusd_pid()
    if pid is None:
        return down_leftovers(stack)
    stack.control.timeout = args.timeout
    began = time.monotonic()
    stop(stack, pid, [], graceful=True, timeout=args.timeout, report=say)
    say(f"stack stopped ({time.monotonic() - began:.1f}s)", sys.stdout)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = _running_stack(args)
    settings = stack.settings_of_stack()
    try:
        records = {r.pid: r for r in read_records(settings)}
    except Exception as exc:
        print(f"registry unreachable: {exc}", file=sys.stderr)
        records = {}
    flapped = read_flapped(stack.run_dir)
    services = service_watchers(stack)
    rows = [("WATCHER", "STATUS", "PID", "UP", "SERVICE", "INSTANCE", "ENDPOINT", "STATE", "LISTENERS")]
    now = time.time()
    for watcher, state in sorted(stack.control.status().items()):
        if watcher in flapped:
            state = f"stopped (flapping, {now - float(flapped[watcher]['at']):.0f}s ago)"
        pids = stack.control.pids(watcher) if state == "active" else []
        if not pids:
            rows.append((watcher, state, "-", "-", "-", "-", "-", "-", "-"))
        for pid in pids:
            rec = records.get(pid)
            if rec is None:
                # A service's process with no record is starting, or cannot reach the registry.
                registered = "unregistered" if watcher in services and records else "-"
                rows.append((watcher, state, str(pid), _uptime(pid, now), "-", "-", "-", registered, "-"))
            else:
                listeners = ",".join(f"{k}={v}" for k, v in rec.listeners.items()) or "-"
                rows.append((watcher, state, str(pid), _uptime(pid, now), rec.service, rec.instance_id,
                             rec.endpoint, rec.state, listeners))
    print(format_table(rows))
    sockets = stack.control.sockets()
    if sockets:
        print("\npublic sockets: " + ", ".join(f"{k}={v}" for k, v in sorted(sockets.items())))
    master = haproxy_master(stack.run_dir)
    print(f"haproxy: master pid {master}" if master is not None else
          f"haproxy: not running (see {stack.run_dir}/haproxy-sync.log and haproxy.log)")
    panel = read_url(stack.run_dir)
    if panel:
        print(f"control panel: {panel}")
    return 0


def _uptime(pid: int, now: float) -> str:
    """How long process ``pid`` has run (``42s``, ``17m``); ``-`` if it is gone."""
    try:
        return age(now - psutil.Process(pid).create_time())
    except psutil.Error:
        return "-"


def cmd_scale(args: argparse.Namespace) -> int:
    if args.count < 0:
        raise StackError("count must be >= 0")
    stack = _stack_with_watcher(args)
    stack.control.scale(args.service, args.count)
    print(f"{args.service}: {stack.control.numprocesses(args.service)} processes")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    _stack_with_watcher(args).control.start(args.service)
    print(f"{args.service} started")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    _stack_with_watcher(args).control.stop(args.service)
    print(f"{args.service} stopped")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    stack = _stack_with_watcher(args)
    if args.service not in service_watchers(stack):
        raise StackError(f"{args.service} is not a meshkit service (its processes do not register), so it "
                         f"cannot be restarted one process at a time; use `meshkit stop {args.service}` "
                         f"and `meshkit start {args.service}`")
    settings = stack.settings_of_stack()

    def registered() -> set[int]:
        return {r.pid for r in read_records(settings) if r.is_up}

    # Subscribed before the first new process starts: a replacement that dies
    # at once is reported with its exit status and the end of its log.
    with ExitWatch(stack.pubsub_endpoint, args.service) as exits:
        def explain(pids: list[int]) -> str:
            gone = exits.of(pids, timeout=1.0)
            return failure_report(gone, stack.watcher_log, "failed as it started") if gone else ""

        restart = RollingRestart(stack.control, args.service, registered, batch=args.batch,
                                 register_timeout=args.register_timeout,
                                 report=lambda text: say(text, sys.stdout), explain=explain)
        steps = restart.run(time.monotonic() + args.timeout)
    replaced = sum(len(step.stopped) for step in steps)
    say(f"{args.service}: restarted, {replaced} processes replaced in {len(steps)} steps", sys.stdout)
    return 0


def cmd_flapguard(args: argparse.Namespace) -> int:
    from ..logs import configure_logging
    from ..metrics import Metrics

    settings = _settings(args)
    stack = Stack(settings, args.run_dir)
    configure_logging(settings, "flapguard", str(os.getpid()))
    policy = FlapPolicy.from_settings(settings, FlapLimit(args.max_restarts, args.window))
    guard = FlapGuard(stack.control, stack.pubsub_endpoint, policy,
                      stack.run_dir, Metrics.from_settings(settings, "flapguard"))
    guard.run()
    return 0
