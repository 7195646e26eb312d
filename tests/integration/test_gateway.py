"""The gateway against real processes: clients connect straight to it (no HAProxy here)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from lineclient import LineClient, error_code, line_clients

from meshkit import Client, Settings
from meshkit.gateway import ConnectionGoneError, ConnectionStore, NoConnectionError, jsonrpc
from meshkit.testing import RedisServer, ServiceProcess, read_records, test_settings, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.gwprobe:GatewayProbe"
_WAIT = 10.0

StartService = Callable[..., list[ServiceProcess]]


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def gateway_env(**options: Any) -> dict[str, str]:
    return {f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()}


def start_gateway(start_service: StartService, settings: Settings | None = None,
                  **options: Any) -> tuple[ServiceProcess, str]:
    [gw] = start_service(GATEWAY, env=gateway_env(**options), settings=settings)
    assert gw.record is not None
    return gw, gw.record.listeners["stratum"]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server this test may kill and restart (it keeps nothing on disk)."""
    server = RedisServer().start()
    yield server
    server.stop()


def conn_key(settings: Settings, conn_id: str) -> str:
    return f"{settings.namespace}:conn:{conn_id}"


def test_calls_reach_the_backend_with_the_connection_id(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    start_service(PROBE)
    gw, address = start_gateway(start_service)
    assert gw.record is not None and "jobs.*" in gw.record.topics
    client = clients(address)
    hello = client.call("mesh.hello")["result"]
    assert hello["gateway"] == gw.record.instance_id
    seen = client.call("gwprobe.whoami")["result"]
    assert seen["connection"] == hello["connection"]
    assert client.call("gwprobe.echo", [[1, "two", None]])["result"] == [1, "two", None]
    assert client.call("gwprobe.echo", {"value": 1, "extra": "x"})["result"] == {
        "value": 1, "named": {"extra": "x"}}
    other = clients(address)
    assert other.call("gwprobe.whoami")["result"]["connection"] != seen["connection"]


def test_bad_input_gets_clear_errors_and_the_connection_stays_open(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    start_service(PROBE)
    _, address = start_gateway(start_service, max_line=1024)
    client = clients(address)
    client.send(b"{this is not json\n")
    parse = client.recv()
    assert parse["id"] is None and error_code(parse) == jsonrpc.PARSE_ERROR
    client.send(b'{"jsonrpc": "2.0", "params": [], "id": 11}\n')
    assert error_code(client.answer(11)) == jsonrpc.INVALID_REQUEST
    started = time.monotonic()
    unknown = client.call("nosuch.method")
    assert error_code(unknown) == jsonrpc.METHOD_NOT_FOUND and "nosuch" in unknown["error"]["message"]
    assert time.monotonic() - started < 1.0  # an unknown service does not wait for a deadline
    assert error_code(client.call("gwprobe.nosuch")) == jsonrpc.METHOD_NOT_FOUND
    assert error_code(client.call("nodot")) == jsonrpc.METHOD_NOT_FOUND
    assert error_code(client.call("gateway.anything")) == jsonrpc.METHOD_NOT_FOUND
    assert error_code(client.call("gwprobe.sleep", ["a", "b", "c"])) == jsonrpc.INVALID_PARAMS
    failed = client.call("gwprobe.fail", ["it broke"])
    assert error_code(failed) == jsonrpc.HANDLER_ERROR
    assert failed["error"]["message"] == "LookupError: it broke"
    assert failed["error"]["data"] == {"code": "handler_error", "type": "LookupError"}
    client.send(b'{"jsonrpc":"2.0","method":"gwprobe.echo","params":["' + b"x" * 5000 + b'"],"id":99}\n')
    too_long = client.recv()
    assert too_long["id"] is None and error_code(too_long) == jsonrpc.LINE_TOO_LONG
    assert client.call("gwprobe.echo", ["still here"])["result"] == "still here"


def test_requests_beyond_the_in_flight_limit_are_refused(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    start_service(PROBE)
    _, address = start_gateway(start_service, max_inflight=2)
    client = clients(address)
    slow = [client.request("gwprobe.sleep", [1.0]) for _ in range(2)]
    extra = client.request("gwprobe.sleep", [0])
    refused = client.answer(extra, timeout=0.9)  # before either slow request finishes
    assert error_code(refused) == jsonrpc.TOO_MANY_IN_FLIGHT
    assert [client.answer(rid)["result"] for rid in slow] == [1.0, 1.0]
    assert client.call("gwprobe.sleep", [0])["result"] == 0


def test_connections_beyond_the_maximum_are_refused_with_an_error(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    _, address = start_gateway(start_service, max_connections=2)
    first, second = clients(address), clients(address)
    for client in (first, second):
        assert "connection" in client.call("mesh.hello")["result"]
    third = clients(address)
    refused = third.recv()
    assert refused["id"] is None and error_code(refused) == jsonrpc.TOO_MANY_CONNECTIONS
    assert third.closed()
    first.close()
    wait_until(lambda: "result" in clients(address).call("mesh.hello"), _WAIT,
               "a connection to be accepted once one closed")


def test_idle_connections_are_closed_and_busy_ones_are_not(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    idle_timeout = 2.0  # the busy client calls twenty times as often: slack for a noisy machine
    _, address = start_gateway(start_service, idle_timeout=idle_timeout)
    idle, busy = clients(address), clients(address)
    started = time.monotonic()
    notice: bytes = b""
    # The busy client keeps calling until the idle one is told (a positive
    # signal, with a deadline), then must still be served.
    while not notice:
        assert time.monotonic() - started < idle_timeout + 4 * _WAIT, "the idle client was never closed"
        assert "result" in busy.call("mesh.hello")
        try:
            notice = idle.line(timeout=0.1)  # the client's pace, and a look at the idle one
        except TimeoutError:
            continue
    assert time.monotonic() - started >= idle_timeout  # never earlier than its timeout
    told = json.loads(notice)
    assert told["id"] is None and error_code(told) == jsonrpc.IDLE_TIMEOUT
    assert idle.closed()
    assert "result" in busy.call("mesh.hello")


def test_subscribed_clients_receive_pushes(
    start_service: StartService, clients: Callable[[str], LineClient], mesh_client: Client
) -> None:
    start_gateway(start_service, topics="jobs.*,news")
    _, address = start_gateway(start_service, topics="jobs.*,news")  # a second gateway
    subscriber, bystander = clients(address), clients(address)
    assert subscriber.call("mesh.subscribe", ["jobs.notify"])["result"] == ["jobs.notify"]
    refused = subscriber.call("mesh.subscribe", ["secret.stuff"])
    assert error_code(refused) == jsonrpc.INVALID_PARAMS
    wait_until(lambda: len(mesh_client.instances("gateway")) == 2, _WAIT, "both gateways")
    assert mesh_client.publish("jobs.notify", {"job_id": "j1", "blob": b"raw"}) == 2
    assert subscriber.push() == {"jsonrpc": "2.0", "method": "jobs.notify",
                                 "params": {"job_id": "j1", "blob": "raw"}}
    mesh_client.publish("news", "not subscribed")
    mesh_client.publish("jobs.notify", {"job_id": "j2"})
    assert subscriber.push()["params"] == {"job_id": "j2"}
    assert bystander.call("mesh.hello")["result"] and not bystander.pushes


def test_connection_state_is_deleted_when_the_connection_closes(
    start_service: StartService, clients: Callable[[str], LineClient],
    mesh_settings: Settings, redis_server: RedisServer,
) -> None:
    start_service(PROBE)
    gw, address = start_gateway(start_service)
    assert gw.record is not None
    client = clients(address)
    conn_id = client.call("mesh.hello")["result"]["connection"]
    assert client.call("gwprobe.remember", ["worker", "w1"])["result"] == {"worker": "w1", "calls": "1"}
    assert client.call("gwprobe.remember", ["worker", "w2"])["result"] == {"worker": "w2", "calls": "2"}
    db = redis_server.client()
    members = db.smembers(f"{mesh_settings.namespace}:gwconns:{gw.record.instance_id}")
    assert members == {conn_id.encode()}
    assert db.hget(conn_key(mesh_settings, conn_id), "_gateway") == gw.record.instance_id.encode()
    client.close()
    wait_until(lambda: not db.exists(conn_key(mesh_settings, conn_id)), _WAIT, "state deleted")
    assert not db.smembers(f"{mesh_settings.namespace}:gwconns:{gw.record.instance_id}")


def test_state_of_a_killed_gateway_is_swept_by_another(
    start_service: StartService, clients: Callable[[str], LineClient],
    mesh_settings: Settings, redis_server: RedisServer,
) -> None:
    start_service(PROBE)
    doomed, address = start_gateway(start_service)
    start_gateway(start_service)  # the survivor
    client = clients(address)
    conn_id = client.call("mesh.hello")["result"]["connection"]
    client.call("gwprobe.remember", ["worker", "w1"])
    db = redis_server.client()
    assert db.exists(conn_key(mesh_settings, conn_id))
    doomed.kill()
    assert client.closed()
    # Record TTL (2 s here), then two sweeps of the survivor (every TTL).
    wait_until(lambda: not db.exists(conn_key(mesh_settings, conn_id)), 4 * mesh_settings.ttl + 5,
               "the survivor to sweep the dead gateway's state")
    assert doomed.record is not None
    assert not db.exists(f"{mesh_settings.namespace}:gwconns:{doomed.record.instance_id}")


def test_a_request_waits_for_a_backend_that_starts_later(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    _, address = start_gateway(start_service, services="gwprobe", request_timeout=15)
    client = clients(address)
    waiting = client.request("gwprobe.echo", ["patience"])
    # Lines on a connection are read in order: once a later built-in request is
    # answered, the first one is in the gateway, waiting for a backend.
    assert "result" in client.call("mesh.hello")
    assert waiting not in client.answers, "answered before any backend existed"
    start_service(PROBE)
    assert client.answer(waiting, timeout=15)["result"] == "patience"


def test_without_a_backend_a_request_times_out_at_its_deadline(
    start_service: StartService, clients: Callable[[str], LineClient]
) -> None:
    _, address = start_gateway(start_service, services="gwprobe", request_timeout=1.0)
    client = clients(address)
    started = time.monotonic()
    answer = client.call("gwprobe.echo", ["nobody home"], timeout=5)
    took = time.monotonic() - started
    assert error_code(answer) == jsonrpc.TIMEOUT and answer["error"]["data"]["code"] == "timeout"
    assert 0.95 <= took < 4.0  # at its deadline, well before the client's own 5 s


def test_a_draining_gateway_keeps_its_clients_for_the_grace_then_closes_them(
    start_service: StartService, clients: Callable[[str], LineClient],
    mesh_settings: Settings, redis_server: RedisServer,
) -> None:
    start_service(PROBE)
    gw, address = start_gateway(start_service, drain_grace=3.0)
    client = clients(address)
    conn_id = client.call("mesh.hello")["result"]["connection"]
    client.call("gwprobe.remember", ["worker", "w1"])
    assert gw.process is not None
    gw.process.send_signal(signal.SIGTERM)
    wait_until(lambda: all(r.state == "draining" for r in read_records(mesh_settings, "gateway")),
               _WAIT, "the gateway to be draining")
    drain_started = time.monotonic()
    # Still served during the grace, with its state intact...
    for _ in range(3):
        assert client.call("gwprobe.remember", ["worker", "w2"])["result"]["worker"] == "w2"
        time.sleep(0.5)  # the client's pace across the grace period
    # ... new connections are refused once the listener closed (HAProxy stopped sending them) ...
    def refused() -> bool:
        try:
            socket.create_connection(tuple(address.rsplit(":", 1)), timeout=1).close()  # type: ignore[arg-type]
        except ConnectionRefusedError:
            return True
        return False
    wait_until(refused, _WAIT, "the listener to close")
    # ... and at the end of the grace it is told and closed cleanly.
    notice = client.recv(timeout=_WAIT)
    assert notice["id"] is None and error_code(notice) == jsonrpc.SHUTTING_DOWN
    assert time.monotonic() - drain_started >= 2.5
    assert client.closed()
    assert gw.process.wait(_WAIT) == 0
    assert not redis_server.client().exists(conn_key(mesh_settings, conn_id))


def test_the_connection_state_api(mesh_settings: Settings) -> None:
    async def main() -> None:
        store = ConnectionStore(mesh_settings)
        try:
            await store.open("gw1-1", "gw1", "127.0.0.1:5000")
            state = store.state("gw1-1")
            assert await state.exists() and await state.all() == {}
            await state.set("worker", "w1")
            await state.set({"a": 1, "b": 2.5})
            assert await state.incr("a") == 2 and await state.incr("n", 5) == 5
            assert await state.get("worker") == "w1" and await state.get("none", "d") == "d"
            assert await state.all() == {"worker": "w1", "a": "2", "b": "2.5", "n": "5"}
            await state.delete("b")
            with pytest.raises(ValueError):
                await state.set("_gateway", "mine")
            with pytest.raises(NoConnectionError):
                store.current()  # not inside a call from a gateway
            await store.close("gw1-1", "gw1")
            assert not await state.exists() and await state.all() == {}
            with pytest.raises(ConnectionGoneError):
                await state.incr("a")
            with pytest.raises(ConnectionGoneError):
                await state.set("worker", "late")
            assert not await state.exists()  # the late writes left nothing behind
        finally:
            await store.aclose()

    asyncio.run(main())


def test_state_lost_in_a_redis_restart_is_restored_for_open_connections(
    start_service: StartService, clients: Callable[[str], LineClient], own_redis: RedisServer,
) -> None:
    settings = test_settings(own_redis.url)
    start_service(PROBE, settings=settings)
    gw, address = start_gateway(start_service, settings)
    assert gw.record is not None
    client = clients(address)
    conn_id = client.call("mesh.hello")["result"]["connection"]
    assert client.call("gwprobe.remember", ["worker", "w1"])["result"] == {"worker": "w1", "calls": "1"}
    bystander = clients(address)  # made no mesh call, so it has no state to restore
    assert "result" in bystander.call("mesh.hello")
    own_redis.kill()
    own_redis.start()
    db = own_redis.client()
    # No request in between: the gateway's sweep (every ttl) brings the state back.
    wait_until(lambda: db.exists(conn_key(settings, conn_id)), 3 * settings.ttl + 5,
               "the gateway to restore the connection's state")
    assert db.hget(conn_key(settings, conn_id), "_gateway") == gw.record.instance_id.encode()
    assert db.smembers(f"{settings.namespace}:gwconns:{gw.record.instance_id}") == {conn_id.encode()}
    # The same connection, not a new one: its calls that need state work again.
    assert client.call("gwprobe.remember", ["worker", "w2"])["result"] == {"worker": "w2", "calls": "1"}
    assert client.call("mesh.hello")["result"]["connection"] == conn_id
    db.close()


def test_state_is_created_again_by_the_next_request_after_a_failure_or_a_loss(
    start_service: StartService, clients: Callable[[str], LineClient], own_redis: RedisServer,
) -> None:
    # Sweeps 60 s apart: none runs during the test, so only requests bring state back.
    settings = test_settings(own_redis.url, ttl=60.0)
    start_service(PROBE, settings=settings)
    _, address = start_gateway(start_service, settings)
    early, late = clients(address), clients(address)
    assert early.call("gwprobe.remember", ["worker", "w1"])["result"] == {"worker": "w1", "calls": "1"}
    own_redis.kill()
    own_redis.start()
    # The backend finds the state gone; the gateway hears it and creates it again.
    lost = early.call("gwprobe.remember", ["worker", "w2"])
    assert error_code(lost) == jsonrpc.HANDLER_ERROR
    assert lost["error"]["data"]["code"] == "connection_gone"  # its wire code, not a class name
    assert early.call("gwprobe.remember", ["worker", "w3"])["result"] == {"worker": "w3", "calls": "1"}
    # A first mesh call while Redis is away: creating the state fails (the
    # call itself needs none) ...
    own_redis.kill()
    assert late.call("gwprobe.whoami")["result"]["connection"]
    own_redis.start()
    # ... and the next request tries again.
    assert late.call("gwprobe.remember", ["worker", "w4"])["result"] == {"worker": "w4", "calls": "1"}


def test_a_stopping_gateway_honours_the_grace_it_is_given(mesh_settings: Settings) -> None:
    """``stop(grace)`` bounds the drain, whatever the ``drain_grace`` option says."""
    from meshkit.gateway import Gateway

    async def main() -> float:
        settings = mesh_settings.replace(service_overrides={"gateway": {"drain_grace": 60.0}})
        gateway = Gateway(settings)
        await gateway.start()
        host, port = gateway.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "mesh.hello"}\n')
        await asyncio.wait_for(reader.readline(), _WAIT)
        started = time.monotonic()
        await asyncio.wait_for(gateway.stop(grace=0.5), _WAIT)
        took = time.monotonic() - started
        # A client that ignores the reconnect notice is still told "shutting down" at the end of the grace.
        lines = []
        while not lines or b"shutting down" not in lines[-1]:
            line = await asyncio.wait_for(reader.readline(), _WAIT)
            assert line, f"closed without a shutting-down notice after {lines}"
            lines.append(line)
        writer.close()
        return took

    assert asyncio.run(main()) < _WAIT
