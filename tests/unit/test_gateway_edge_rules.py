"""The gateway edge's pure parts: limits, the ban policy and list, wave plans, gone services,
PROXY header reading, options. Time is driven by hand; no network, no sleeps."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshkit.errors import ConfigError
from meshkit.gateway import jsonrpc, waves
from meshkit.gateway.admission import Guard, client_of
from meshkit.gateway.bans import Ban, BanList, BanPolicy, change, normalize_address
from meshkit.gateway.limits import ADDRESS_LIMIT, CONNECT_RATE, AddressLimits, Exemptions, TokenBucket
from meshkit.gateway.moving import GoneWatch, reconnect_line
from meshkit.gateway.options import GatewayOptions
from meshkit.gateway.proxy_front import Client, ProxyFront
from meshkit.gateway.proxy_protocol import ProxyHeaderError


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- limits ------------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # never above the burst
    assert all(TokenBucket(0.0, 1, 0.0).take(0.0) for _ in range(100))  # rate 0: no limit


def test_address_limits_count_open_connections_and_connect_rate() -> None:
    limits = AddressLimits(max_per_address=2, connect_rate=1.0, connect_burst=3, max_addresses=10)
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) == ADDRESS_LIMIT  # spends rate all the same
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1", 0.0) == CONNECT_RATE
    assert limits.admit("10.0.0.1", 1.0) is None  # a token refilled, a place is free
    assert limits.admit("10.0.0.2", 1.0) is None  # others are not affected
    assert limits.open == {"10.0.0.1": 2, "10.0.0.2": 1}
    for _ in range(3):
        limits.release("10.0.0.1")
    assert "10.0.0.1" not in limits.open


def test_address_limits_remember_a_bounded_number_of_addresses() -> None:
    limits = AddressLimits(max_per_address=0, connect_rate=1.0, connect_burst=1, max_addresses=100)
    for i in range(10_000):
        limits.admit(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 0.0)
    assert limits.tracked == 100


def test_exemptions_match_networks_and_refuse_bad_ones() -> None:
    exempt = Exemptions(["127.0.0.0/8", "::1", "10.1.0.0/16"])
    assert "127.0.0.1" in exempt and "::1" in exempt and "10.1.200.3" in exempt
    assert "10.2.0.1" not in exempt and "not an ip" not in exempt
    with pytest.raises(ConfigError, match="not an IP network"):
        Exemptions(["10.0.0.0/99"])


# -- bans ----------------------------------------------------------------------------------


def test_ban_policy_has_nomps_shape() -> None:
    policy = BanPolicy(ratio=0.5, min_requests=4, max_addresses=10)
    # 2 bad of 4: at least half, banned when the 4th is counted.
    assert [policy.record("a", bad) for bad in (True, False, True, False)] == [False, False, False, True]
    # 1 bad of 4: not banned, and the counts start again.
    assert [policy.record("b", bad) for bad in (True, False, False, False)] == [False] * 4
    assert [policy.record("b", bad) for bad in (True, True, True)] == [False] * 3
    assert policy.record("b", False)  # 3 of the new 4
    assert policy.tracked == 0


def test_ban_policy_forgets_the_least_recent_address_beyond_its_cap() -> None:
    policy = BanPolicy(ratio=1.0, min_requests=2, max_addresses=2)
    policy.record("a", True)
    policy.record("b", True)
    policy.record("c", True)  # "a" is forgotten
    assert policy.tracked == 2
    assert not policy.record("a", True)  # counting from scratch
    assert policy.record("c", True)


def test_ban_list_expires_and_keeps_the_longest_bans_when_full() -> None:
    bans = BanList(max_entries=2)
    bans.add(Ban("10.0.0.1", until=100.0))
    bans.add(Ban("10.0.0.2", until=300.0))
    assert bans.get("10.0.0.1", 99.0) is not None and bans.get("10.0.0.1", 100.0) is None
    bans.add(Ban("10.0.0.3", until=200.0))  # full: the soonest to end goes
    assert len(bans) == 2 and bans.get("10.0.0.1", 0.0) is None
    bans.replace([Ban("10.0.0.9", 50.0), Ban("10.0.0.8", 500.0)], now=60.0)
    assert bans.get("10.0.0.8", 60.0) is not None and len(bans) == 1


def test_ban_change_messages_are_validated() -> None:
    add = json.dumps({"op": "add", "address": "::ffff:192.0.2.1", "until": 5.0, "reason": "x"})
    assert change(add) == ("add", Ban("192.0.2.1", 5.0, "x"))
    assert change(json.dumps({"op": "rm", "address": "2001:db8::1"})) == ("rm", "2001:db8::1")
    for bad in (b"{", "[]", json.dumps({"op": "add", "address": "nope", "until": 1}),
                json.dumps({"op": "add", "address": "1.2.3.4", "until": "soon"}),
                json.dumps({"op": "zap"}), "x" * 5000, 42):
        assert change(bad) is None, bad
    with pytest.raises(ValueError):
        normalize_address("1.2.3.4:5")


def test_guard_refuses_banned_addresses_and_judges_only_what_it_is_told() -> None:
    clock, wall = Clock(0.0), Clock(1000.0)
    options = GatewayOptions(ban_min_requests=2, ban_ratio=0.5, ban_on=("client",), ban_time=60.0)
    guard = Guard(options, clock=clock, wall=wall)
    assert not guard.limited("127.0.0.1") and not guard.limited(None) and guard.limited("192.0.2.1")
    assert not guard.judge("192.0.2.1", "invalid")  # not in ban_on: not even counted
    assert not guard.judge("192.0.2.1", "client")
    assert guard.judge("192.0.2.1", "ok")  # 1 bad of 2
    ban = guard.ban_here("192.0.2.1", "too many bad shares")
    assert ban.until == 1060.0
    refusal = guard.admit("192.0.2.1")
    assert refusal is not None and refusal[0] == jsonrpc.BANNED and refusal[2] == {"until": 1060.0}
    wall.now = 1061.0
    assert guard.admit("192.0.2.1") is None
    assert guard.admit("127.0.0.1") is None and guard.request_bucket("127.0.0.1") is None


# -- waves and gone services ----------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 7, 40, 2000])
def test_waves_spread_every_client_over_the_window(count: int) -> None:
    plan = waves.plan(count, window=10.0)
    assert sum(n for _, n in plan) == count
    assert plan[0][0] == 0.0 and all(0 <= offset < 10.0 for offset, _ in plan)
    assert max(n for _, n in plan) - min(n for _, n in plan) <= 1 or count < len(plan)
    if count >= 40:
        assert len(plan) == 40 and plan[-1][0] == 9.75


@pytest.mark.parametrize("rate", [0.5, 2.5, 10.0, 100.0, 333.0])
def test_waves_never_exceed_the_rate_in_any_second(rate: float) -> None:
    plan = waves.plan(2000 if rate >= 10 else 20, window=10.0, rate=rate)
    assert sum(n for _, n in plan) == (2000 if rate >= 10 else 20)
    assert waves.peak_per_second(plan) <= max(1.0, rate)
    offsets = [offset for offset, _ in plan]
    assert offsets == sorted(offsets)


def test_waves_keep_the_even_plan_when_it_fits_the_rate() -> None:
    assert waves.plan(100, window=10.0, rate=50.0) == waves.plan(100, window=10.0)
    assert waves.plan(0, window=10.0) == []


def test_gone_watch_reports_once_per_absence() -> None:
    instances = {"mining": 1}
    watch = GoneWatch(after=2.0, instances=lambda s: instances.get(s, 0))
    assert watch.check(["mining"], 0.0) == []
    instances["mining"] = 0
    assert watch.check(["mining"], 1.0) == []
    assert watch.check(["mining"], 2.9) == []
    assert watch.check(["mining"], 3.0) == ["mining"]
    assert watch.check(["mining"], 10.0) == []  # once
    instances["mining"] = 1
    assert watch.check(["mining"], 11.0) == []
    instances["mining"] = 0
    assert watch.check(["mining"], 12.0) == []
    assert watch.check(["mining"], 14.0) == ["mining"]  # a new absence


def test_reconnect_notifications() -> None:
    stratum = GatewayOptions(reconnect_method="client.reconnect", reconnect_address="pool.example:3333")
    assert json.loads(reconnect_line(stratum)) == {
        "jsonrpc": "2.0", "method": "client.reconnect", "params": ["pool.example", 3333, 0]}
    assert json.loads(reconnect_line(GatewayOptions())) == {
        "jsonrpc": "2.0", "method": "mesh.reconnect", "params": {}}


# -- PROXY headers ---------------------------------------------------------------------------


class _Socket(asyncio.Transport):
    """A transport that only names its peer and records what the front did to it."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def abort(self) -> None:
        pass


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


def read(data: bytes, mode: str, peer: tuple[str, int] = ("127.0.0.1", 9)) -> tuple[Client, bytes]:
    """Feed ``data`` then an EOF to the front every TCP and HTTP connection starts with.

    Returns the client it handed the connection on for and the client bytes
    after the header; raises ProxyHeaderError if it refused the connection.
    """
    async def main() -> tuple[Client, bytes]:
        handed: list[Client] = []
        refused: list[str] = []
        inner = _Inner()

        def factory(client: Client) -> asyncio.Protocol:
            handed.append(client)
            return inner

        front = ProxyFront(factory, None, mode, 5.0, refused.append)
        front.connection_made(_Socket(peer))
        if data:
            front.data_received(data)
        front.eof_received()
        if refused:
            raise ProxyHeaderError(refused[0])
        return handed[0], inner.data
    return asyncio.run(main())


V2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 127, 0, 0, 1])
      + (5555).to_bytes(2, "big") + (3333).to_bytes(2, "big"))


def test_the_header_is_read_and_the_client_bytes_after_it_are_kept() -> None:
    client, rest = read(V2 + b'{"id":1}\n', "require")
    assert client == ("203.0.113.7:5555", "203.0.113.7")
    assert rest == b'{"id":1}\n'
    client, rest = read(b"PROXY TCP6 2001:db8::5 ::1 7 3333\r\nhello", "accept")
    assert client == ("[2001:db8::5]:7", "2001:db8::5")
    assert rest == b"hello"


def test_require_refuses_what_accept_passes_through() -> None:
    line = b'{"jsonrpc":"2.0","method":"mesh.ping","id":1}\n'
    with pytest.raises(ProxyHeaderError):
        read(line, "require")
    peer = ("127.0.0.1:9", "127.0.0.1")  # no header: the socket's own peer
    assert read(line, "accept") == (peer, line)
    assert read(line, "off") == (peer, b"")  # nothing read: the connection reads it itself
    with pytest.raises(ProxyHeaderError):
        read(b"PROXY TCP4 300.0.0.1 127.0.0.1 1 2\r\n", "accept")  # an invalid header is never served
    with pytest.raises(ProxyHeaderError, match="closed before"):
        read(V2[:20], "require")
    assert read(b"", "accept") == (peer, b"")  # connected and left: not refused, its EOF is its own


def test_a_local_header_is_the_proxys_own_connection() -> None:
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"  # HAProxy's health check
    client, _ = read(local, "require", peer=("127.0.0.1", 4242))
    assert client == ("127.0.0.1:4242", None)
    assert client_of(None, ("::ffff:192.0.2.1", 80)) == ("[::ffff:192.0.2.1]:80", "192.0.2.1")


# -- options ---------------------------------------------------------------------------------


def test_edge_options_are_checked() -> None:
    from meshkit.config import Settings

    with pytest.raises(ConfigError, match="proxy_protocol"):
        GatewayOptions(proxy_protocol="maybe")
    with pytest.raises(ConfigError, match="ban_on"):
        GatewayOptions(ban_on=("rude",))
    with pytest.raises(ConfigError, match="reconnect_address"):
        GatewayOptions(reconnect_address="nohost")
    options = GatewayOptions.from_settings(Settings(), env={
        "MESHKIT_GATEWAY_GONE_DISCONNECT": "yes", "MESHKIT_GATEWAY_LIMIT_EXEMPT": ""})
    assert options.gone_disconnect is True and options.limit_exempt == ()
    with pytest.raises(ConfigError, match="gone_disconnect"):
        GatewayOptions.from_settings(Settings(), env={"MESHKIT_GATEWAY_GONE_DISCONNECT": "perhaps"})
