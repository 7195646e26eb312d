"""The Redis URL forms (meshkit.redisconn): what parses to what, what is refused and how it is said."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio.sentinel as aiosentinel

from meshkit.config import Settings
from meshkit.errors import ConfigError
from meshkit.redisconn import (
    DEFAULT_PORT,
    DEFAULT_SENTINEL_PORT,
    AsyncMajoritySentinel,
    AsyncSSLConnection,
    AsyncUnixConnection,
    RedisTarget,
    async_client,
    connection_kwargs,
    parse_redis_url,
    sync_client,
)


def test_plain_tls_unix_and_sentinel_urls_parse() -> None:
    plain = parse_redis_url("redis://reg:s3cret@db.example:6380/2")
    assert (plain.scheme, plain.hosts, plain.db, plain.username, plain.password) == (
        "redis", (("db.example", 6380),), 2, "reg", "s3cret")
    tls = parse_redis_url("rediss://db.example/0?ca_file=/etc/ca.pem&cert_file=/c.pem&key_file=/k.pem")
    assert tls.tls and tls.hosts == (("db.example", DEFAULT_PORT),)  # a URL without a port
    assert (tls.ca_file, tls.cert_file, tls.key_file) == ("/etc/ca.pem", "/c.pem", "/k.pem")
    unix = parse_redis_url("unix:///run/redis.sock?db=3&password=pw")
    assert (unix.path, unix.db, unix.password) == ("/run/redis.sock", 3, "pw")
    sentinel = parse_redis_url("redis+sentinel://reg:pw@10.0.0.1:26380,10.0.0.2,[fd00::3]:5000/main/1")
    assert sentinel.hosts == (("10.0.0.1", 26380), ("10.0.0.2", DEFAULT_SENTINEL_PORT), ("fd00::3", 5000))
    assert (sentinel.master, sentinel.db, sentinel.username) == ("main", 1, "reg")


def test_the_password_never_shows_in_repr() -> None:
    assert "s3cret" not in repr(parse_redis_url("redis://reg:s3cret@db:6380/0"))


@pytest.mark.parametrize(("url", "why"), [
    ("http://db:6380", "must be redis://"),
    ("redis://a:1,b:2/0", "several are redis\\+sentinel://"),
    ("redis://db:99999/0", "port must be"),
    ("redis://db:6380/x", "database must be a number"),
    ("redis://db:6380/0?ssl_cert_reqs=none", "does not take ssl_cert_reqs"),
    ("redis://db:6380/0?ca_file=/ca.pem", "does not take ca_file"),
    ("rediss://db:6380/0?cert_file=/c.pem", "cert_file and key_file go together"),
    ("redis+sentinel://a:1,b:2", "takes /master"),
    ("redis+sentinel://a:1/m/0/extra", "takes /master"),
    ("unix://host/path", "takes a socket path"),
    ("redis://u:pw@db:6380/0?password_file=/p", "password_file at once"),
    ("redis://u:pw@db:6380/0?password=again", "twice"),
])
def test_bad_urls_are_refused_with_the_reason_and_the_password_masked(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as caught:
        parse_redis_url(url)
    assert "pw@" not in str(caught.value) and "again" not in str(caught.value)


def test_settings_take_every_form_and_refuse_the_rest() -> None:
    Settings(redis_url="redis+sentinel://a:26390,b:26390,c:26390/main")
    with pytest.raises(ConfigError, match="must be redis://"):
        Settings(redis_url="memcached://db")


def test_a_password_file_is_read_when_the_client_is_made_and_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "redis.pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    target = parse_redis_url(f"redis://reg@db:6380/0?password_file={secret}")
    assert target.password is None and target.secret() == "hunter2"
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        target.secret()
    secret.chmod(0o600)
    secret.write_text("one\ntwo\n")
    with pytest.raises(ConfigError, match="one non-empty line"):
        target.secret()
    with pytest.raises(ConfigError, match="cannot read"):
        RedisTarget("redis", (("db", 1),), password_file=str(tmp_path / "missing")).secret()


def test_tls_always_verifies_the_server_and_its_name() -> None:
    kwargs = connection_kwargs(parse_redis_url("rediss://db:6380/0?ca_file=/ca.pem"), 1.0)
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_certfile"] is None


def test_clients_are_made_without_io_with_the_connection_that_drops_a_demoted_primary() -> None:
    asyncio.run(_make_clients())


async def _make_clients() -> None:
    client = async_client("rediss://db:6380/0?ca_file=/ca.pem", timeout=0.5, max_connections=4, blocking=True)
    pool = client.connection_pool
    assert pool.connection_class is AsyncSSLConnection and pool.max_connections == 4
    await client.aclose()
    unix = async_client("unix:///run/redis.sock")
    assert unix.connection_pool.connection_class is AsyncUnixConnection
    await unix.aclose()
    sentinel = async_client("redis+sentinel://a:26390,b:26390/main")
    # redis-py's own Sentinel connection already turns READONLY into a reconnect.
    assert sentinel.connection_pool.connection_class is aiosentinel.SentinelManagedConnection
    assert sentinel.connection_pool.service_name == "main"
    # Each Sentinel is asked once (an unreachable one must not hold up the lookup).
    manager = sentinel.connection_pool.sentinel_manager
    assert isinstance(manager, AsyncMajoritySentinel)
    assert [s.get_retry().get_retries() for s in manager.sentinels] == [0, 0]
    assert sentinel.connection_pool.connection_kwargs["retry"].get_retries() == 2
    await sentinel.aclose()
    sync_client("redis://db:6380/0").close()


def test_a_url_that_cannot_be_read_names_no_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_redis_url("redis://reg:topsecret@db:notaport/0")
    assert "topsecret" not in str(caught.value) and "***" in str(caught.value)


def _master(ip: str, ok: bool = True) -> dict[str, object]:
    return {"main": {"ip": ip, "port": 7000, "is_master": ok}}


def test_the_primary_is_the_one_a_majority_of_sentinels_names() -> None:
    from redis.sentinel import MasterNotFoundError

    from meshkit.redisconn import _majority

    def check(state: dict[str, object], service: str) -> bool:
        return bool(state["is_master"])

    # A Sentinel back from a partition still names the old primary: outvoted.
    assert _majority([_master("10.0.0.2"), _master("10.0.0.1"), _master("10.0.0.2")], "main", check, 3) == (
        "10.0.0.2", 7000)
    assert _majority([_master("10.0.0.2"), OSError("cut off"), _master("10.0.0.2")], "main", check, 3) == (
        "10.0.0.2", 7000)
    # One answer of three, or a split, or a primary its Sentinels see as down: no primary at all.
    for answers in ([_master("10.0.0.2"), OSError(), OSError()],
                    [_master("10.0.0.1"), _master("10.0.0.2"), OSError()],
                    [_master("10.0.0.2", ok=False), _master("10.0.0.2", ok=False), _master("10.0.0.2")]):
        with pytest.raises(MasterNotFoundError, match="majority of the 3 Sentinels"):
            _majority(list(answers), "main", check, 3)
