"""The mesh commands: ``meshkit run``, ``ls``, ``call`` and ``publish``.

Each finds its Redis with :func:`meshkit.rundir.choose_registry` and, when
it was not named by ``MESHKIT_REDIS_URL``, says on stderr which one it reads.
``ls``, ``call`` and ``publish`` first check that the registry answers
(:func:`~meshkit.cli.reach.check_registry`): an unreachable Redis is an
error (exit status 1), never an empty mesh. ``ls`` probes every instance
it lists (:func:`~meshkit.cli.reach.probe_instances`) and shows those it
cannot reach as ``unreachable``; ``ls --wait N`` first waits until ``N``
instances are up (a script's "are they all registered yet?").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from redis.exceptions import RedisError

from ..config import Settings
from ..errors import BadArgumentsError, CallTimeoutError, MeshError, NoInstanceError
from ..record import InstanceRecord
from ..rundir import RegistryChoice, choose_registry
from ..untrusted import clip
from .args import parse_call_args, parse_json, positive_seconds
from .output import EXIT_OK, age, error_payload, exit_status, format_table, json_default
from .reach import check_registry, probe_instances, unreachable

UNREACHABLE = "unreachable"


def add_commands(sub: Any) -> None:
    """Register ``run``, ``ls``, ``call`` and ``publish`` on the ``meshkit`` parser."""
    run = sub.add_parser("run", help="run one instance of a service")
    run.add_argument("target", metavar="MODULE:CLASS")
    run.set_defaults(func=cmd_run)

    ls = sub.add_parser("ls", help="list live instances (each one is probed)",
                        description="List the instances in the registry. Each is probed with a "
                        "connection, as a caller would: one that refuses it or does not answer "
                        "within dead_after is shown as 'unreachable' though its record is still there.")
    ls.add_argument("service", nargs="?")
    ls.add_argument("--json", action="store_true", help="one JSON array of records")
    ls.add_argument("--no-probe", action="store_true", help="show the records as they are, without probing")
    ls.add_argument("--wait", type=int, default=0, metavar="N",
                    help="first wait until N instances are up (exit 1 if not within --timeout)")
    ls.add_argument("--timeout", type=positive_seconds, default=15.0, help="seconds for --wait (default 15)")
    ls.set_defaults(func=cmd_ls)

    call = sub.add_parser(
        "call", help="call a method; prints the result as JSON",
        description="Each ARG is a JSON value (a positional argument) or KEY=JSON (a keyword "
        "argument). Examples: meshkit call hello greet '\"world\"';  meshkit call hello greet "
        "who='\"world\"';  meshkit call hello greet --raw world.")
    call.add_argument("service")
    call.add_argument("method")
    call.add_argument("args", nargs="*", metavar="ARG", help="JSON, or KEY=JSON for a keyword argument")
    call.add_argument("--raw", action="store_true",
                      help="take every ARG (and every KEY=TEXT's TEXT) as a string, not JSON")
    call.add_argument("--timeout", type=positive_seconds, help="seconds (default: call_timeout)")
    call.add_argument("--wait", action="store_true", help="wait for an instance up to the timeout")
    call.add_argument("--json", action="store_true",
                      help='print {"result": ...} or {"error": {"code": ..., "message": ...}} on stdout')
    call.add_argument("--trace", action="store_true",
                      help="print the call's trace id on stderr (for meshkit trace TRACE_ID)")
    call.set_defaults(func=cmd_call, intermixed="args")

    publish = sub.add_parser("publish", help="push a JSON payload to a topic's subscribers")
    publish.add_argument("topic")
    publish.add_argument("payload", metavar="JSON")
    publish.add_argument("--timeout", type=positive_seconds)
    publish.set_defaults(func=cmd_publish)


def registry_choice(args: argparse.Namespace, check: bool = True) -> RegistryChoice:
    """The settings for this command; says on stderr which Redis when it was found rather than named."""
    choice = choose_registry(Settings.load(getattr(args, "config", None)), os.environ)
    if not choice.explicit:
        print(f"registry: {choice.describe()}", file=sys.stderr, flush=True)
    if check:
        check_registry(choice.settings)
    return choice


def cmd_run(args: argparse.Namespace) -> int:
    from ..runner import load_class, run

    cls = load_class(args.target)
    return run(cls, registry_choice(args, check=False).settings)


def cmd_ls(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings
    records = _read_waiting(settings, args.service, args.wait, args.timeout)
    reach = {} if args.no_probe else probe_instances((r.endpoint for r in records), settings.dead_after)
    if args.json:
        print(json.dumps([_record_json(r, reach) for r in records], indent=2))
        return EXIT_OK
    now = time.time()
    rows = [("SERVICE", "INSTANCE", "ENDPOINT", "STATE", "AGE", "PID", "METHODS")]
    for r in records:
        state = UNREACHABLE if reach.get(r.endpoint) else r.state
        rows.append((r.service, r.instance_id, r.endpoint, state, age(now - r.started_at),
                     str(r.pid), ",".join(r.methods) or "-"))
    print(format_table(rows))
    if not records:
        print(f"no instances{' of ' + clip(args.service) if args.service else ''} in namespace "
              f"{settings.namespace}", file=sys.stderr)
    down = [r for r in records if reach.get(r.endpoint)]
    if down:
        print(f"{len(down)} unreachable ({', '.join(sorted({str(reach[r.endpoint]) for r in down}))}): "
              "callers route around them; their records stay until their TTL runs out",
              file=sys.stderr)
    return EXIT_OK


def _read_waiting(settings: Settings, service: str | None, count: int, timeout: float) -> list[InstanceRecord]:
    """The records; with ``count``, once that many are up, or :class:`~meshkit.errors.CallTimeoutError`."""
    from ..registry import read_records

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(settings, service)
        except RedisError as exc:
            raise unreachable(settings, exc) from None
        up = sum(1 for r in records if r.is_up)
        if up >= count:
            return records
        if time.monotonic() > deadline:
            raise CallTimeoutError(f"{up} of {count} instances{' of ' + clip(service) if service else ''} "
                                   f"up after {timeout:g}s", service=service or "")
        time.sleep(0.05)


def _record_json(record: InstanceRecord, reach: dict[str, str | None]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(record.to_json())
    if record.endpoint in reach:
        problem = reach[record.endpoint]
        data["reachable"] = problem is None
        if problem is not None:
            data["unreachable"] = problem
    return data


def cmd_call(args: argparse.Namespace) -> int:
    try:
        result = _call(args)
    except MeshError as exc:
        if not args.json:
            raise
        print(json.dumps({"error": error_payload(exc)}, default=json_default))
        return exit_status(exc)
    print(json.dumps({"result": result} if args.json else result, default=json_default))
    return EXIT_OK


def _call(args: argparse.Namespace) -> Any:
    from ..blocking import Client

    values, kwargs = parse_call_args(args.args, raw=args.raw)  # before any I/O: bad input costs nothing
    settings = registry_choice(args).settings
    traceparent = None
    if getattr(args, "trace", False):
        from ..trace import TraceContext

        root = TraceContext.new_root()
        traceparent = root.traceparent()
        print(f"trace: {root.trace_id}", file=sys.stderr, flush=True)
    with Client(settings) as client:
        try:
            return client.call(args.service, args.method, values, kwargs, timeout=args.timeout,
                               wait=args.wait, traceparent=traceparent)
        except NoInstanceError as exc:
            raise NoInstanceError(
                f"{exc.message} in namespace {settings.namespace} (meshkit ls lists what is there)",
                service=exc.service, method=exc.method) from None
        except BadArgumentsError as exc:
            # The records carry each method's signature (when they had room): show it.
            known = {r.signatures[args.method] for r in client.instances(args.service) if args.method in r.signatures}
            if not known:
                raise
            raise BadArgumentsError(f"{exc.message}; {clip(args.method)}{clip(sorted(known)[0], 300)}",
                                    service=exc.service, method=exc.method) from None


def cmd_publish(args: argparse.Namespace) -> int:
    from ..blocking import Client

    payload = parse_json(args.payload, "the payload")
    settings = registry_choice(args).settings
    with Client(settings) as client:
        delivered = client.publish(args.topic, payload, timeout=args.timeout)
    print(json.dumps({"delivered": delivered}))
    return EXIT_OK

