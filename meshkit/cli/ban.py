"""``meshkit ban ls|add|rm``: the client-address bans every gateway of the namespace enforces.

``meshkit ban ls [--json]``                         the bans in force: address, time left, reason
``meshkit ban add ADDRESS [--seconds N] [--reason TEXT]``  ban an IP address (default 600 s)
``meshkit ban rm ADDRESS``                          lift a ban (exit 1 if there was none)

They read and write the ``<ns>:bans`` hash and publish each change, so every
gateway applies it within a moment (:mod:`meshkit.gateway.bans`); a gateway
closes the open connections of an address as it is banned. An address that
is not an IP address is a usage error (exit 2); an unreachable Redis exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from ..config import Settings
from ..errors import ConfigError
from ..gateway.bans import Ban, BanStore, normalize_address
from ..redisconn import async_client
from ..untrusted import clip
from .args import positive_seconds
from .mesh import registry_choice
from .output import EXIT_FAILED, EXIT_OK, age, format_table
from .reach import unreachable

T = TypeVar("T")


def add_commands(sub: Any) -> None:
    """Register ``ban`` and its verbs on the ``meshkit`` parser."""
    ban = sub.add_parser("ban", help="list, add or lift client-address bans (every gateway)")
    verbs = ban.add_subparsers(metavar="VERB")
    ls = verbs.add_parser("ls", help="the bans in force")
    ls.add_argument("--json", action="store_true", help="one JSON array of {address, until, reason}")
    ls.set_defaults(func=cmd_ls)
    add = verbs.add_parser("add", help="ban an IP address")
    add.add_argument("address", type=_address)
    add.add_argument("--seconds", type=positive_seconds, default=600.0, help="how long (default 600)")
    add.add_argument("--reason", default="banned by an operator")
    add.set_defaults(func=cmd_add)
    rm = verbs.add_parser("rm", help="lift a ban")
    rm.add_argument("address", type=_address)
    rm.set_defaults(func=cmd_rm)


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {clip(text)!r}") from None


def _run(settings: Settings, work: Callable[[BanStore], Awaitable[T]]) -> T:
    async def main() -> T:
        client = async_client(settings.redis_url, timeout=5.0)
        try:
            return await work(BanStore(client, settings.namespace))
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except (RedisError, OSError) as exc:
        raise unreachable(settings, exc) from None
    except ValueError as exc:  # a malformed redis URL
        raise ConfigError(str(exc)) from None


def cmd_ls(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings
    bans: list[Ban] = _run(settings, lambda store: store.bans())
    if args.json:
        print(json.dumps([{"address": b.address, "until": b.until, "reason": b.reason} for b in bans]))
        return EXIT_OK
    now = time.time()
    rows = [("ADDRESS", "LEFT", "REASON")]
    rows += [(b.address, age(b.until - now), b.reason or "-") for b in bans]
    print(format_table(rows))
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings
    ban = _run(settings, lambda store: store.add(args.address, args.seconds, args.reason))
    print(json.dumps({"address": ban.address, "until": ban.until, "reason": ban.reason}))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    settings = registry_choice(args).settings
    if _run(settings, lambda store: store.remove(args.address)):
        print(json.dumps({"removed": args.address}))
        return EXIT_OK
    print(f"error: no ban on {args.address}", file=sys.stderr)
    return EXIT_FAILED
