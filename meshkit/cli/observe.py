"""The commands that look inside the running mesh: ``trace``, ``inspect``, ``stats``, ``tap``, ``log-level``.

``meshkit trace TRACE_ID [--json]``        the spans of one trace from every live instance, as a waterfall
``meshkit trace --slow|--errors SERVICE``  recent slow or failed traces of a service (their ids, to expand)
``meshkit inspect INSTANCE [--json]``      one instance's info, stats, calls in flight, recent spans
``meshkit stats [SERVICE] [--watch]``      per-method rates, error rates, p50/p99 across instances
``meshkit tap [SERVICE[.METHOD]] [--where K=V ...] [--max-rps N] [--errors] [--min-latency-ms MS]``
                                           live calls and pushes, rate-limited at each instance
``meshkit log-level SERVICE LEVEL [--where K=V ...]``  a run-time log level, for all or matching calls

They ask the reserved ``_mesh.*`` methods (docs/observability.md) through
:mod:`meshkit.observe.query`. An instance that does not answer is named on
stderr, never fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..client import AsyncClient
from ..config import Settings
from ..errors import NoInstanceError
from ..observe import query, render
from ..trace import TraceContext
from ..untrusted import clip
from .args import UsageError, positive_seconds
from .mesh import registry_choice
from .output import EXIT_FAILED, EXIT_OK, json_default


def add_commands(sub: Any) -> None:
    """Register ``trace``, ``inspect``, ``stats``, ``tap`` and ``log-level``."""
    trace = sub.add_parser("trace", help="show a trace as a waterfall, or list slow or failed traces",
                           description="Asks every live instance for the spans of TRACE_ID (kept in each "
                           "instance's bounded span buffer) and prints the tree.")
    trace.add_argument("trace_id", nargs="?", metavar="TRACE_ID")
    trace.add_argument("--slow", metavar="SERVICE", help="list the slowest recent traces of SERVICE")
    trace.add_argument("--errors", metavar="SERVICE", help="list the latest failed traces of SERVICE")
    trace.add_argument("--limit", type=int, default=20)
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(func=cmd_trace)

    inspect = sub.add_parser("inspect", help="look inside one instance (id or unique prefix)")
    inspect.add_argument("instance")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    stats = sub.add_parser("stats", help="per-method rates, errors and latencies across instances")
    stats.add_argument("service", nargs="?")
    stats.add_argument("--interval", type=positive_seconds, default=1.0, metavar="SECONDS",
                       help="rates are measured over this window (default 1)")
    stats.add_argument("--watch", action="store_true", help="print again every interval (Ctrl-C stops)")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    tap = sub.add_parser("tap", help="watch calls and pushes live (rate-limited at the source)")
    tap.add_argument("target", nargs="?", metavar="SERVICE[.METHOD]")
    tap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="only calls whose metadata has KEY=VALUE (repeatable)")
    tap.add_argument("--max-rps", type=float, default=20.0, help="events per second per instance (default 20)")
    tap.add_argument("--errors", action="store_true", help="only failed calls")
    tap.add_argument("--min-latency-ms", type=float, default=0.0)
    tap.add_argument("--count", type=int, default=1000, help="stop after this many events per instance")
    tap.add_argument("--duration", type=positive_seconds, default=60.0, help="stop after this many seconds")
    tap.add_argument("--json", action="store_true", help="one JSON object per line")
    tap.set_defaults(func=cmd_tap)

    level = sub.add_parser("log-level", help="set a log level at run time, for everyone or matching calls")
    level.add_argument("service")
    level.add_argument("level", help="DEBUG, INFO, WARNING, ERROR, CRITICAL, or reset (with --where)")
    level.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    level.set_defaults(func=cmd_log_level)


def _where(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--where takes KEY=VALUE, got {clip(pair)!r}")
        out[key] = value
    return out


def _run(settings: Settings, work: Callable[[AsyncClient], Coroutine[Any, Any, int]]) -> int:
    async def main() -> int:
        async with AsyncClient(settings) as client:
            return await work(client)
    return asyncio.run(main())


def _missing(missing: dict[str, str]) -> None:
    for instance, why in sorted(missing.items()):
        print(f"instance {instance} did not answer: {why}", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    chosen = [x for x in (args.trace_id, args.slow, args.errors) if x]
    if len(chosen) != 1:
        raise UsageError("give a TRACE_ID, or --slow SERVICE, or --errors SERVICE")
    if args.trace_id and not TraceContext.is_valid_id(args.trace_id):
        raise UsageError(f"a trace id is 32 lower-case hex digits, got {clip(args.trace_id)!r}")
    settings = registry_choice(args).settings

    async def work(client: AsyncClient) -> int:
        if args.trace_id:
            got = await query.trace(client, args.trace_id)
            if args.json:
                print(json.dumps(got, default=json_default, indent=2))
            else:
                print(render.waterfall(args.trace_id, got["tree"], got["missing"]))
            return EXIT_OK if got["spans"] else EXIT_FAILED
        select, service = ("slow", args.slow) if args.slow else ("errors", args.errors)
        spans = await query.slow_or_failed(client, service, select, args.limit)
        print(json.dumps(spans, indent=2) if args.json else render.span_list(spans))
        return EXIT_OK

    return _run(settings, work)


def cmd_inspect(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings

    async def work(client: AsyncClient) -> int:
        ids = [r.instance_id for r in client.registry.instances() if r.instance_id.startswith(args.instance)]
        if len(ids) != 1:
            raise NoInstanceError(f"{len(ids)} instances match {clip(args.instance)!r} in namespace "
                                  f"{settings.namespace} (meshkit ls lists them)")
        got = await query.inspect_instance(client, ids[0])
        print(json.dumps(got, default=json_default, indent=2) if args.json else render.inspect_text(got))
        return EXIT_OK

    return _run(settings, work)


def cmd_stats(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings

    async def work(client: AsyncClient) -> int:
        sampler = query.StatsSampler()
        await query.stats(client, args.service, sampler)  # the start of the first window
        while True:
            await asyncio.sleep(args.interval)  # the window the rates are measured over
            got = await query.stats(client, args.service, sampler)
            if args.json:
                print(json.dumps(got, default=json_default), flush=True)
            else:
                print(render.stats_table(got), flush=True)
            if not args.watch:
                return EXIT_OK
            if not args.json:
                print()

    return _run(settings, work)


def cmd_tap(args: argparse.Namespace) -> int:
    service, method = None, None
    if args.target:
        service, _, method_part = args.target.partition(".")
        method = method_part or None
    flt: dict[str, Any] = {"where": _where(args.where), "errors_only": args.errors,
                           "min_latency_ms": args.min_latency_ms}
    if method:
        flt["method"] = method
    settings = registry_choice(args).settings

    async def work(client: AsyncClient) -> int:
        tap = query.Tap(client, service, flt, max_rps=args.max_rps, max_events=args.count, ttl_s=args.duration)
        await tap.open()
        _missing(tap.missing)
        if not tap.taps:
            raise NoInstanceError(f"no instance{' of ' + clip(service) if service else ''} could be tapped")
        print(f"tapping {len(tap.taps)} instances (Ctrl-C stops)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.duration
        try:
            async for event in tap:
                print(json.dumps(event, default=json_default) if args.json else render.event_line(event),
                      flush=True)
                if time.monotonic() > deadline:
                    break
        finally:
            await tap.close()
        return EXIT_OK

    return _run(settings, work)


def cmd_log_level(args: argparse.Namespace) -> int:
    where = _where(args.where) or None
    settings = registry_choice(args).settings

    async def work(client: AsyncClient) -> int:
        records = [r for r in client.registry.instances(args.service)]
        if not records:
            raise NoInstanceError(f"no live instance of {clip(args.service)!r}", service=args.service)
        answers, missing = await query.ask_all(client, records, "log_level", args.level, where)
        for instance, answer in sorted(answers.items()):
            print(f"{instance}: level {answer['level']}"
                  + "".join(f"; {r['level']} where {r['where']}" for r in answer["rules"]))
        _missing(missing)
        return EXIT_OK if not missing else EXIT_FAILED

    return _run(settings, work)
