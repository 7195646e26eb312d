"""``meshkit resources [--json]``: what the cluster uses of each named resource now.

One row per ``[resources.<name>]`` table of the settings (docs/limits.md):
its limits, the units granted in the current rate window and per second
(the last ``1 / window`` windows), and the concurrency slots held and wanted
by the live instances, read from Redis (never written). An unreachable
Redis exits 1; no resources configured says so on stderr and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from redis.exceptions import RedisError

from ..resources import cluster_usage
from ..storage import redis_client
from .mesh import registry_choice
from .output import EXIT_OK, format_table
from .reach import unreachable


def add_commands(sub: Any) -> None:
    """Register ``resources`` on the ``meshkit`` parser."""
    cmd = sub.add_parser("resources", help="cluster-wide use of each named resource (docs/limits.md)")
    cmd.add_argument("--json", action="store_true", help="one JSON array, one object per resource")
    cmd.set_defaults(func=cmd_resources)


def cmd_resources(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings
    limits = settings.resource_limits()
    if not limits:
        print("no [resources.<name>] tables in the settings (MESHKIT_CONFIG or --config)", file=sys.stderr)
        return EXIT_OK

    async def read() -> list[dict[str, Any]]:
        redis = redis_client(settings)
        try:
            return [await cluster_usage(redis, settings.namespace, name, limit) for name, limit in limits.items()]
        finally:
            await redis.aclose()

    try:
        found = asyncio.run(read())
    except (RedisError, OSError) as exc:
        raise unreachable(settings, exc) from None
    if args.json:
        print(json.dumps(found, indent=2))
        return EXIT_OK
    rows = [("RESOURCE", "RATE/S", "WINDOW", "PER SECOND", "CONCURRENCY", "HELD", "WANTED", "HOLDERS")]
    for usage in found:
        per_second = sum(usage["rate_used"][:max(1, round(1 / usage["window"]))])
        rows.append((usage["resource"], f"{usage['rate']:g}" if usage["rate"] else "-",
                     str(usage["rate_used"][0]) if usage["rate"] else "-",
                     str(per_second) if usage["rate"] else "-",
                     str(usage["concurrency"] or "-"),
                     str(sum(usage["held"].values())) if usage["concurrency"] else "-",
                     str(sum(usage["wanted"].values())) if usage["concurrency"] else "-",
                     ",".join(f"{k}={v}" for k, v in sorted(usage["held"].items())) or "-"))
    print(format_table(rows))
    return EXIT_OK
