"""Redis connections: what a Redis URL may say, and every Redis client meshkit makes from it.

Every Redis client in meshkit (registry, registrations, gateway state, bans,
tools, the stack) is made here, by :func:`async_client` or :func:`sync_client`,
so TLS, ACL users, Sentinel and the reaction to a demoted primary are the same
everywhere. The URL forms (:func:`parse_redis_url` checks them; anything else
is a :class:`~meshkit.errors.ConfigError` naming the URL, password masked):

* ``redis://[user[:password]@]host[:port][/db]`` — plain TCP;
* ``rediss://[user[:password]@]host[:port][/db]?ca_file=…[&cert_file=…&key_file=…]``
  — TLS. The server's certificate is always verified, host name included,
  against ``ca_file`` (or the system's CAs without it); ``cert_file`` and
  ``key_file`` (both or neither) are the client's certificate for servers
  started with ``tls-auth-clients yes``;
* ``unix://[user[:password]@]/path/to/redis.sock[?db=N]`` — a unix socket;
* ``redis+sentinel://[user[:password]@]host:port,host:port,…/master[/db]`` — ask
  these Sentinels where the primary of ``master`` is, and ask again whenever
  the connection to it is lost or it answers ``READONLY``. Every Sentinel is
  asked (once, within the timeout) and the primary named by a majority of
  them is taken (:class:`AsyncMajoritySentinel` says why). The user and
  password are those of the data nodes; the Sentinels are asked without.

Every form also takes ``?password=…`` (redis-py's spelling; the same as
``:password@``) and ``password_file=/path``: the password is read from that
file (one line; it must not be readable by others) when the client is made,
so it stays out of command lines and environments. A password in the URL and
a password file at once is an error.

**A demoted primary.** redis-py keeps a connection open to whatever it first
reached; when that node is demoted to a replica without dropping its clients
(a failover seen through a partition, a manual ``REPLICAOF``), every write
gets ``READONLY`` for ever. Here a ``READONLY`` answer closes that connection
and is raised as a ``ConnectionError``; the client's retry then opens a new
connection, which for Sentinel means asking the Sentinels for the primary
again (*rediscovery*) and for a plain URL means resolving the name again.
Connection errors are retried :data:`RETRIES` times at once (a write is
idempotent in meshkit's use: a record SET, a PUBLISH that views tolerate
twice); timeouts are not retried, so an unreachable Redis fails in one
``timeout``, never in several.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.connection as aioconn
import redis.asyncio.retry as aioretry
import redis.asyncio.sentinel as aiosentinel
import redis.backoff
import redis.connection as syncconn
import redis.retry
import redis.sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigError
from .untrusted import clip

__all__ = ["RETRIES", "SCHEMES", "RedisTarget", "async_client", "parse_redis_url", "redacted_url", "sync_client"]

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
RETRIES = 2  # immediate retries of a command whose connection failed (READONLY included)
DEFAULT_PORT = 6379  # Redis's own default, used only when a URL names a host without a port
DEFAULT_SENTINEL_PORT = 26379
_QUERY = {  # what each scheme's query string may hold
    "redis": {"password", "password_file"},
    "rediss": {"password", "password_file", "ca_file", "cert_file", "key_file"},
    "unix": {"password", "password_file", "db"},
    "redis+sentinel": {"password", "password_file"},
}


def redacted_url(url: str) -> str:
    """``url`` with any password (``user:pw@`` or ``?password=``) shown as ``***``, for logs and errors."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)],
                          safe="*/")
        # Spelled out: urlunsplit drops the empty authority of unix:///path.
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "<unparsable redis url>"


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """One parsed Redis URL (see the module doc); the password never shows in ``repr``."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()  # the server (redis, rediss) or the Sentinels
    path: str = ""  # the unix socket
    master: str = ""  # the Sentinel master name
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def secret(self) -> str | None:
        """The password: from the URL, or read from :attr:`password_file` now (``ConfigError`` if it cannot be)."""
        if not self.password_file:
            return self.password
        try:
            mode = os.stat(self.password_file).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"redis password file {clip(self.password_file)} is readable by others "
                                  f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
            with open(self.password_file, encoding="utf-8") as f:
                lines = f.read(4096).splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the redis password file {clip(self.password_file)}: "
                              f"{clip(exc.strerror or str(exc))}") from None
        if len(lines) != 1 or not lines[0]:
            raise ConfigError(f"redis password file {clip(self.password_file)} must hold one non-empty line")
        return lines[0]


def parse_redis_url(url: str) -> RedisTarget:
    """The :class:`RedisTarget` ``url`` names; ``ConfigError`` (URL redacted) for anything outside the forms."""
    try:
        return _parse(url)
    except ConfigError as exc:
        raise ConfigError(f"redis_url {clip(redacted_url(url), 200)!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"redis_url {clip(redacted_url(url), 200)!r}: {clip(str(exc))}") from None


def _parse(url: str) -> RedisTarget:
    if not isinstance(url, str):
        raise ConfigError("must be a string")
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ConfigError("must be redis://, rediss://, unix:// or redis+sentinel://")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - _QUERY[scheme])
    if unknown:
        raise ConfigError(f"{scheme}:// does not take {', '.join(clip(k, 40) for k in unknown)} "
                          f"(it takes {', '.join(sorted(_QUERY[scheme]))})")
    userinfo, at, hostports = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    if "password" in query:
        if password is not None:
            raise ConfigError("a password in the URL twice (user:password@ and ?password=)")
        password = query["password"]
    if password is not None and query.get("password_file"):
        raise ConfigError("a password in the URL and a password_file at once")
    if bool(query.get("cert_file")) != bool(query.get("key_file")):
        raise ConfigError("cert_file and key_file go together")
    common: dict[str, Any] = dict(scheme=scheme, username=username, password=password,
                                  password_file=query.get("password_file", ""))
    if scheme == "unix":
        if hostports or not parts.path:
            raise ConfigError("unix:// takes a socket path: unix:///path/to/redis.sock")
        return RedisTarget(path=unquote(parts.path), db=_db(query.get("db", "0")), **common)
    if scheme == "redis+sentinel":
        segments = [s for s in parts.path.split("/") if s]
        if not 1 <= len(segments) <= 2:
            raise ConfigError("redis+sentinel:// takes /master or /master/db after the Sentinels")
        sentinels = tuple(_hostport(h, DEFAULT_SENTINEL_PORT) for h in hostports.split(","))
        return RedisTarget(hosts=sentinels, master=unquote(segments[0]),
                           db=_db(segments[1]) if len(segments) == 2 else 0, **common)
    if "," in hostports:
        raise ConfigError(f"{scheme}:// names one server; several are redis+sentinel://")
    return RedisTarget(hosts=(_hostport(hostports, DEFAULT_PORT),), db=_db(parts.path.strip("/") or "0"),
                       ca_file=query.get("ca_file", ""), cert_file=query.get("cert_file", ""),
                       key_file=query.get("key_file", ""), **common)


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    host, port = text, str(default_port)
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not host:
        raise ConfigError(f"a server needs a host, got {clip(text, 60)!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"port must be 1-65535, got {clip(port, 20)!r}")
    return host, int(port)


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 10_000:
        raise ConfigError(f"database must be a number, got {clip(text, 20)!r}")
    return int(text)


# -- connections that drop a demoted primary --------------------------------

def _demoted() -> RedisConnectionError:
    return RedisConnectionError("READONLY: the server is no longer a primary; reconnecting")


class _AsyncRediscovering:
    """Mixin: a ``READONLY`` answer closes the connection and raises ``ConnectionError`` (retried)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ReadOnlyError:
            await self.disconnect()  # type: ignore[attr-defined]
            raise _demoted() from None


class _SyncRediscovering:
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ReadOnlyError:
            self.disconnect()  # type: ignore[attr-defined]
            raise _demoted() from None


class AsyncTCPConnection(_AsyncRediscovering, aioconn.Connection):
    pass


class AsyncSSLConnection(_AsyncRediscovering, aioconn.SSLConnection):
    pass


class AsyncUnixConnection(_AsyncRediscovering, aioconn.UnixDomainSocketConnection):
    pass


class SyncTCPConnection(_SyncRediscovering, syncconn.Connection):
    pass


class SyncSSLConnection(_SyncRediscovering, syncconn.SSLConnection):
    pass


class SyncUnixConnection(_SyncRediscovering, syncconn.UnixDomainSocketConnection):
    pass


# -- Sentinels that must agree ---------------------------------------------

def _majority(answers: list[object], service: str, check: Callable[[dict[str, Any], str], bool],
              sentinels: int) -> tuple[str, int]:
    """The primary's address that more than half of ``sentinels`` name; else ``MasterNotFoundError``."""
    votes: Counter[tuple[str, int]] = Counter()
    for masters in answers:
        state = masters.get(service) if isinstance(masters, dict) else None
        if state and check(state, service):
            votes[(str(state["ip"]), int(state["port"]))] += 1
    if votes:
        address, count = votes.most_common(1)[0]
        if count > sentinels // 2:
            return address
    raise redis.sentinel.MasterNotFoundError(
        f"no primary for {clip(service)!r} named by a majority of the {sentinels} Sentinels "
        f"({sum(votes.values())} answered: {dict(votes)})")


class AsyncMajoritySentinel(aiosentinel.Sentinel):
    """Asks every Sentinel at once and takes the primary a majority names.

    redis-py takes the first Sentinel's word. A Sentinel that was cut off
    during a failover still names the old primary when it comes back (until
    its peers' hello messages reach it), and that old primary still accepts
    writes until it is demoted: the first Sentinel's word would split the
    registry in two for seconds. Sentinel itself fails over only with a
    majority; clients follow only a majority too.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = await asyncio.gather(*(s.sentinel_masters() for s in self.sentinels), return_exceptions=True)
        return _majority(list(answers), service_name, self.check_master_state, len(self.sentinels))


class SyncMajoritySentinel(redis.sentinel.Sentinel):
    """:class:`AsyncMajoritySentinel` for blocking clients (the Sentinels asked one after another)."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        answers: list[object] = []
        for sentinel in self.sentinels:
            try:
                answers.append(sentinel.sentinel_masters())
            except (RedisConnectionError, RedisTimeoutError) as exc:
                answers.append(exc)
        return _majority(answers, service_name, self.check_master_state, len(self.sentinels))


# -- clients ----------------------------------------------------------------

def connection_kwargs(target: RedisTarget, timeout: float) -> dict[str, Any]:
    """What every connection to a data node of ``target`` is made with (no class, no retry)."""
    kwargs: dict[str, Any] = dict(socket_timeout=timeout, socket_connect_timeout=timeout, db=target.db,
                                  username=target.username, password=target.secret())
    if target.scheme == "unix":
        kwargs["path"] = target.path
    elif target.scheme != "redis+sentinel":
        kwargs["host"], kwargs["port"] = target.hosts[0]
    if target.tls:
        kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True,
                      ssl_ca_certs=target.ca_file or None,
                      ssl_certfile=target.cert_file or None, ssl_keyfile=target.key_file or None)
    return kwargs


def _sentinel_kwargs(timeout: float, no_retry: object) -> dict[str, Any]:
    """How each Sentinel is asked: one try, ``timeout`` at most.

    Not redis-py's default of ten retries with back-off: with one Sentinel
    unreachable (its host cut off, often the primary's own), every lookup of
    the primary would spend some fifteen seconds on it before asking the
    next; one try each, and the next Sentinel is asked within ``timeout``.
    """
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": no_retry}


def async_client(url: str, *, timeout: float = 1.0, max_connections: int | None = None,
                 blocking: bool = False, wait: float | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (bytes replies; see the module doc for READONLY and retries).

    ``timeout`` bounds each connect and each reply. ``max_connections`` bounds
    the pool; with ``blocking`` a command waits up to ``wait`` seconds
    (``timeout`` unless told) for a free connection instead of failing at once
    (Sentinel pools do not block: they fail when full). Raises ``ConfigError``
    for a bad URL.
    """
    target = parse_redis_url(url)
    kwargs = connection_kwargs(target, timeout)
    retry = aioretry.Retry(redis.backoff.NoBackoff(), RETRIES, supported_errors=(RedisConnectionError,))
    if target.scheme == "redis+sentinel":
        sentinel = AsyncMajoritySentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            list(target.hosts),
            sentinel_kwargs=_sentinel_kwargs(timeout, aioretry.Retry(redis.backoff.NoBackoff(), 0)))
        if max_connections is not None:
            kwargs["max_connections"] = max_connections
        kwargs["retry"] = retry
        client: aioredis.Redis = sentinel.master_for(target.master, **kwargs)
        return client
    cls: type[aioconn.AbstractConnection] = {"unix": AsyncUnixConnection, "rediss": AsyncSSLConnection}.get(
        target.scheme, AsyncTCPConnection)
    pool_cls: type[aioconn.ConnectionPool] = aioconn.BlockingConnectionPool if blocking else aioconn.ConnectionPool
    pool_kwargs: dict[str, Any] = dict(connection_class=cls, retry=retry, **kwargs)
    if max_connections is not None:
        pool_kwargs["max_connections"] = max_connections
    if blocking:
        pool_kwargs["timeout"] = timeout if wait is None else wait
    return aioredis.Redis.from_pool(pool_cls(**pool_kwargs))


def sync_client(url: str, *, timeout: float = 2.0) -> redis.Redis:
    """A blocking client for ``url``, for tools and tests (same rules as :func:`async_client`)."""
    target = parse_redis_url(url)
    kwargs = connection_kwargs(target, timeout)
    retry = redis.retry.Retry(redis.backoff.NoBackoff(), RETRIES, supported_errors=(RedisConnectionError,))
    if target.scheme == "redis+sentinel":
        sentinel = SyncMajoritySentinel(  # type: ignore[no-untyped-call]  # unannotated in redis-py
            list(target.hosts),
            sentinel_kwargs=_sentinel_kwargs(timeout, redis.retry.Retry(redis.backoff.NoBackoff(), 0)))
        kwargs["retry"] = retry
        client: redis.Redis = sentinel.master_for(target.master, **kwargs)  # type: ignore[no-untyped-call]
        return client
    cls: Callable[..., Any] = {"unix": SyncUnixConnection, "rediss": SyncSSLConnection}.get(
        target.scheme, SyncTCPConnection)
    pool = redis.ConnectionPool(connection_class=cls, retry=retry, **kwargs)
    return redis.Redis.from_pool(pool)  # from_pool: closing the client closes its pool
