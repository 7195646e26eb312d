"""The ``meshkit haproxy`` command: ``render``, ``sync`` and ``stop``.

``meshkit haproxy render [--config FILE] [--bind NAME=ADDR]... [--run-dir DIR] [--check] [-o FILE]``
    Print (or write to FILE) the HAProxy configuration for the registry as it
    is now; ``--check`` also runs ``haproxy -c`` on it (exit 1 if rejected).
    An unreachable Redis is reported and the configuration rendered without
    servers.

``meshkit haproxy sync [--config FILE] [--bind NAME=ADDR]... [--run-dir DIR] [--attach
[--stats-socket PATH] [--master-socket PATH]] [--haproxy PATH]``
    Run the sync process (:mod:`meshkit.haproxy.sync`). Without ``--attach``
    it drives the HAProxy of ``DIR``: the master already running from
    ``DIR/haproxy.cfg`` if there is one, else one it starts, detached
    (``haproxy -W -S DIR/haproxy-master.sock -f DIR/haproxy.cfg``, inheriting
    every ``fd@N`` a frontend binds). With ``--attach`` it only drives an
    HAProxy already running from ``DIR/haproxy.cfg`` through the given
    sockets. SIGTERM/SIGINT stop it with exit status 0 within 3 s and leave
    HAProxy serving; SIGHUP re-reads ``--config``.

``meshkit haproxy stop [--run-dir DIR] [--config FILE] [--timeout SECONDS]``
    Stop the HAProxy of ``DIR`` (what ``meshkit down`` does once the stack
    has stopped): softly, then hard in the last 2 s, then SIGKILL, within
    ``--timeout`` (default: ``stop_timeout`` from FILE, else 10) + 1 s; see
    :func:`meshkit.haproxy.process.stop_haproxy`. Exit status 0, also when
    none was running.

``--bind stratum=fd@5`` overrides the ``bind`` of frontend ``stratum``: this
is how a listening socket inherited from Circus (``$(circus.sockets.stratum)``)
reaches HAProxy. Settings (Redis, namespace, ``run_dir``) come from
``MESHKIT_*`` variables and the top-level ``--config`` file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ConfigError, MeshError
from ..haproxy.config import DEFAULT_CONFIG, ProxyConfig, load_proxy_config
from ..haproxy.errors import ConfigCheckError
from ..haproxy.model import build_model
from ..haproxy.process import STOP_TIMEOUT
from ..haproxy.render import RuntimePaths, check_config, render, write_config

log = logging.getLogger("meshkit.haproxy.command")


def add_commands(subparsers: Any) -> None:
    """Register ``haproxy render``, ``haproxy sync`` and ``haproxy stop`` on the CLI's sub-parsers."""
    parser = subparsers.add_parser("haproxy", help="HAProxy in front of the gateways (render, sync, stop)")
    parser.set_defaults(func=lambda args: _usage(parser))
    actions = parser.add_subparsers(metavar="ACTION")

    render_cmd = actions.add_parser("render", help="print the HAProxy configuration for the current registry")
    _common(render_cmd)
    render_cmd.add_argument("--check", action="store_true", help="validate it with haproxy -c")
    render_cmd.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (atomically) instead")
    render_cmd.set_defaults(func=cmd_render)

    sync_cmd = actions.add_parser("sync", help="keep HAProxy's servers in step with the registry")
    _common(sync_cmd)
    sync_cmd.add_argument("--attach", action="store_true", help="only drive a running HAProxy, never start one")
    sync_cmd.add_argument("--stats-socket", metavar="PATH", help="runtime API socket (default: RUN_DIR/haproxy.sock)")
    sync_cmd.add_argument("--master-socket", metavar="PATH",
                          help="master CLI socket (default: RUN_DIR/haproxy-master.sock)")
    sync_cmd.set_defaults(func=cmd_sync)

    stop_cmd = actions.add_parser("stop", help="stop the HAProxy of a run directory, softly if it allows")
    stop_cmd.add_argument("--run-dir", metavar="DIR", help="its configuration and sockets (default: settings run_dir)")
    stop_cmd.add_argument("--config", dest="haproxy_config", metavar="FILE", default=DEFAULT_CONFIG,
                          help=f"where stop_timeout is read if --timeout is not given (default: {DEFAULT_CONFIG})")
    stop_cmd.add_argument("--timeout", type=float, metavar="SECONDS",
                          help=f"the whole stop's budget (default: stop_timeout, else {STOP_TIMEOUT:.0f})")
    stop_cmd.set_defaults(func=cmd_stop)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="haproxy_config", metavar="FILE", default=DEFAULT_CONFIG,
                        help=f"public listeners and HAProxy settings (default: {DEFAULT_CONFIG})")
    parser.add_argument("--bind", action="append", default=[], metavar="NAME=ADDR",
                        help="bind frontend NAME to ADDR instead (host:port or fd@N); repeatable")
    parser.add_argument("--run-dir", metavar="DIR", help="configuration and sockets (default: settings run_dir)")
    parser.add_argument("--haproxy", metavar="PATH", help="the haproxy program (default: found on PATH or sbin)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def parse_binds(values: list[str]) -> dict[str, str]:
    """``["stratum=fd@5"]`` → ``{"stratum": "fd@5"}``; raise :class:`ConfigError` if malformed."""
    binds = {}
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or not name or not address:
            raise ConfigError(f"--bind expects NAME=ADDR (like stratum=fd@5), got {value!r}")
        binds[name] = address
    return binds


def load(args: argparse.Namespace) -> tuple[Settings, ProxyConfig, RuntimePaths]:
    """Settings, HAProxy config (with ``--bind`` applied) and paths named by the arguments."""
    settings = Settings.load(getattr(args, "config", None))
    config = load_proxy_config(args.haproxy_config).with_binds(parse_binds(args.bind))
    paths = RuntimePaths.in_dir(args.run_dir or settings.run_dir)
    if getattr(args, "stats_socket", None):
        paths = replace(paths, stats_socket=Path(args.stats_socket).absolute())
    if getattr(args, "master_socket", None):
        paths = replace(paths, master_socket=Path(args.master_socket).absolute())
    return settings, config, paths


def cmd_render(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from ..registry import read_records

    settings, config, paths = load(args)
    try:
        records = read_records(settings)
    except (RedisError, OSError) as exc:
        print(f"warning: cannot read the registry ({exc}); rendering without servers", file=sys.stderr)
        records = []
    model = build_model(config, records)
    for problem in model.problems:
        print(f"warning: cannot route to {problem}", file=sys.stderr)
    text = render(model, paths, args.haproxy_config)
    if args.check:
        try:
            check_config(text, model, args.haproxy)
        except ConfigCheckError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.output:
        write_config(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from ..logs import configure_logging

    settings, config, paths = load(args)
    configure_logging(settings, "haproxy-sync", str(os.getpid()))
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(run_sync(settings, config, paths, attach=args.attach, haproxy=args.haproxy,
                         source=args.haproxy_config, binds=parse_binds(args.bind)))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from ..haproxy.process import stop_haproxy

    run_dir = args.run_dir or Settings.load(getattr(args, "config", None)).run_dir
    timeout = args.timeout
    if timeout is None:
        try:
            timeout = load_proxy_config(args.haproxy_config).stop_timeout
        except ConfigError:
            timeout = STOP_TIMEOUT  # no readable config here: stopping must not depend on one
    how = stop_haproxy(run_dir, timeout)
    said = {"none": "was not running", "soft": "stopped softly", "hard": "stopped hard (clients were cut)",
            "killed": "killed (it did not stop in time)"}
    print(f"haproxy in {run_dir} {said[how]}")
    return 0


async def run_sync(
    settings: Settings,
    config: ProxyConfig,
    paths: RuntimePaths,
    *,
    attach: bool = False,
    haproxy: str | None = None,
    source: str = DEFAULT_CONFIG,
    binds: dict[str, str] | None = None,
) -> None:
    """Run :class:`~meshkit.haproxy.sync.HAProxySync` until SIGTERM or SIGINT; SIGHUP re-reads ``source``."""
    from ..haproxy.sync import HAProxySync

    sync = HAProxySync(settings, config, paths, attach=attach, haproxy=haproxy, source=source)
    loop = asyncio.get_running_loop()

    def reread() -> None:
        try:
            sync.set_config(load_proxy_config(source).with_binds(binds or {}))
            log.info("re-read %s", source)
        except MeshError as exc:
            log.error("keeping the current HAProxy config: %s", exc)

    loop.add_signal_handler(signal.SIGTERM, sync.request_stop)
    loop.add_signal_handler(signal.SIGINT, sync.request_stop)
    loop.add_signal_handler(signal.SIGHUP, reread)
    try:
        await sync.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
