"""The ``meshkit`` command line.

``meshkit run MODULE:CLASS``            run one service instance (graceful on SIGTERM)
``meshkit ls [--json] [SERVICE]``       live instances: endpoint, state, age, methods
``meshkit call SERVICE METHOD [ARG..]`` each ARG is a JSON value; prints the result as JSON
``meshkit publish TOPIC JSON``          push to every subscriber; prints how many acknowledged
``meshkit haproxy render|sync|stop``    HAProxy in front of the gateways (docs/haproxy.md)
``meshkit up|down|status|scale|start|stop``  the Circus stack (docs/operations.md)

Settings come from ``MESHKIT_*`` variables and the file named by
``MESHKIT_CONFIG`` or ``--config``. Errors print one line to stderr and
exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from . import __version__
from .config import Settings
from .errors import CallError, MeshError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except CallError as exc:
        print(f"error: [{exc.code}] {exc}", file=sys.stderr)
        return 1
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshkit", description="A brokerless ZeroMQ service mesh.")
    parser.add_argument("--version", action="version", version=f"meshkit {__version__}")
    parser.add_argument("--config", help="TOML settings file (default: $MESHKIT_CONFIG)")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run one instance of a service")
    run.add_argument("target", metavar="MODULE:CLASS")
    run.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list live instances")
    ls.add_argument("service", nargs="?")
    ls.add_argument("--json", action="store_true", help="one JSON array of records")
    ls.set_defaults(func=cmd_ls)

    call = sub.add_parser("call", help="call a method; prints the result as JSON")
    call.add_argument("service")
    call.add_argument("method")
    call.add_argument("args", nargs="*", metavar="ARG", help="a JSON value (bare words are strings)")
    call.add_argument("--timeout", type=float, help="seconds (default: call_timeout)")
    call.add_argument("--wait", action="store_true", help="wait for an instance up to the timeout")
    call.set_defaults(func=cmd_call)

    publish = sub.add_parser("publish", help="push a JSON payload to a topic's subscribers")
    publish.add_argument("topic")
    publish.add_argument("payload", metavar="JSON")
    publish.add_argument("--timeout", type=float)
    publish.set_defaults(func=cmd_publish)

    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands() -> list[Any]:
    from .haproxy.command import add_commands as haproxy_commands
    from .stack.commands import add_commands as stack_commands

    return [haproxy_commands, stack_commands]


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings.load(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import load_class, run

    return run(load_class(args.target), settings_from(args))


def cmd_ls(args: argparse.Namespace) -> int:
    from .registry import read_records

    settings = settings_from(args)
    try:
        records = read_records(settings, args.service)
    except RedisError as exc:
        raise MeshError(f"registry at {settings.redis_url} unreachable: {exc}") from None
    if args.json:
        print(json.dumps([json.loads(r.to_json()) for r in records], indent=2))
        return 0
    now = time.time()
    rows = [("SERVICE", "INSTANCE", "ENDPOINT", "STATE", "AGE", "PID", "METHODS")]
    for r in records:
        rows.append((r.service, r.instance_id, r.endpoint, r.state, _age(now - r.started_at),
                     str(r.pid), ",".join(r.methods) or "-"))
    print(format_table(rows))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from .sync import Client

    values = [parse_json_arg(a) for a in args.args]
    with Client(settings_from(args)) as client:
        result = client.call(args.service, args.method, values, timeout=args.timeout, wait=args.wait)
    print(json.dumps(result, default=_json_default))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .sync import Client

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise MeshError(f"payload is not JSON: {exc}") from None
    with Client(settings_from(args)) as client:
        delivered = client.publish(args.topic, payload, timeout=args.timeout)
    print(json.dumps({"delivered": delivered}))
    return 0


def parse_json_arg(text: str) -> Any:
    """A JSON value; text that is not JSON is taken as a string (``echo hi`` works)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": __import__("base64").b64encode(value).decode()}
    return repr(value)
