"""The registry's layout in Redis, and reading it without trusting it.

Layout, under the namespace ``ns`` (every key family is named in
:mod:`meshkit.keys`; see :mod:`meshkit.registry` for who writes what and when):

* ``ns:inst:<service>:<instance_id>`` — one :class:`~meshkit.record.InstanceRecord` as JSON, with a TTL;
* ``ns:changes`` — the pub/sub channel announcing every change.

Reads are bounded in bytes: values are fetched with ``GETRANGE key 0
MAX_RECORD_BYTES`` (at most one byte past the limit ever crosses the
network), and :func:`parse_stored` accepts only a valid record stored under
its own key. Names are glob-escaped in ``SCAN MATCH`` patterns.

:func:`read_records` and :func:`load_records` read synchronously, for tools;
the second turns an unreachable Redis into :class:`~meshkit.errors.RegistryUnreachableError`.
A Redis URL shown in a log line or an error passes through :func:`redacted_url`; every
client is made by :mod:`meshkit.redisconn` (TLS, ACL users, Sentinel, a demoted primary).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import names
from .config import Settings
from .errors import RegistryUnreachableError
from .keys import Keys
from .record import MAX_RECORD_BYTES, InstanceRecord
from .redisconn import async_client, redacted_url, sync_client
from .untrusted import clip

__all__ = ["SCAN_BATCH", "Keys", "load_records", "parse_stored", "read_records", "redacted_url",
           "redis_client", "validate_key"]

SCAN_BATCH = 500  # keys read per round trip


def redis_client(settings: Settings) -> aioredis.Redis:
    """An asyncio Redis client for ``settings.redis_url`` with short timeouts (made by :mod:`meshkit.redisconn`).

    Short timeouts matter: a Redis outage must show up as quick errors in the
    background tasks, never as a stalled heartbeat.
    """
    return async_client(settings.redis_url, timeout=1.0)


def parse_stored(keys: Keys, key: bytes | str, value: object) -> InstanceRecord | None:
    """The record read (bounded) from Redis ``key``; ``None`` if it expired meanwhile.

    Raises ``ValueError`` (value clipped) for anything else than a valid
    record stored under its own key: an oversized or malformed value, a value
    of another Redis type, a record that names another service or instance.
    """
    if isinstance(value, Exception):  # WRONGTYPE: someone stored a hash or a list there
        raise ValueError(f"not a string value ({clip(str(value))})")
    if not isinstance(value, (bytes, str)):
        raise ValueError(f"unexpected reply {clip(value)}")
    if not value:
        return None  # GETRANGE of a missing key: it expired between SCAN and the read
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"more than {MAX_RECORD_BYTES} bytes")
    record = InstanceRecord.from_json(value)
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if keys.instance(record.key) != text:
        raise ValueError(f"the record is for {clip(record.key)!r}, stored under another key")
    return record


def validate_key(key: Any) -> str:
    """``key`` if it is an instance key ``<service>:<instance_id>`` of the grammar; else ``ValueError``."""
    service, sep, instance = str(key).partition(":") if isinstance(key, str) else ("", "", "")
    if not sep:
        raise ValueError(f"instance key must be service:instance_id, got {clip(key)!r}")
    names.validate_service_name(service)
    names.validate_instance_id(instance)
    return str(key)


def read_records(settings: Settings, service: str | None = None) -> list[InstanceRecord]:
    """The valid records in Redis right now, read synchronously (for tools and tests).

    Invalid records are skipped. Raises ``RedisError`` or ``OSError`` if Redis
    cannot be read; :func:`load_records` raises :class:`RegistryUnreachableError` instead.
    """
    keys = Keys(settings.namespace)
    client = sync_client(settings.redis_url, timeout=2.0)
    try:
        found = list(client.scan_iter(match=keys.match(service), count=SCAN_BATCH))
        records = []
        for start in range(0, len(found), SCAN_BATCH):
            batch = found[start:start + SCAN_BATCH]
            pipe = client.pipeline(transaction=False)
            for key in batch:
                pipe.getrange(key, 0, MAX_RECORD_BYTES)
            for key, value in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                try:
                    record = parse_stored(keys, key, value)
                except ValueError:
                    continue
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda r: (r.service, r.started_at))
    finally:
        client.close()


def load_records(settings: Settings, service: str | None = None) -> list[InstanceRecord]:
    """:func:`read_records`, but an unreachable Redis raises :class:`RegistryUnreachableError`.

    So a tool can say "registry unreachable" (naming the URL, password
    masked, and the error) instead of "no instances" when Redis is down,
    refuses the password or does not answer in 2 s.
    """
    try:
        return read_records(settings, service)
    except (RedisError, OSError) as exc:
        raise RegistryUnreachableError(redacted_url(settings.redis_url),
                                       clip(str(exc) or type(exc).__name__, 300)) from exc
