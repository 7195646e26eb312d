"""Calls end to end: values, errors, deadlines, waiting, tracing, metadata, the CLI.

Every test runs real service processes against a private redis-server (see
``meshkit.testing``), each in its own registry namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import meshkit
from meshkit import Client, Settings
from meshkit.testing import ServiceProcess, settings_env, wait_until

pytestmark = pytest.mark.integration

ECHO = "services.echo:Echo"
RELAY = "tests.integration.services.relay:Relay"
WORKER = "tests.integration.services.worker:Worker"

HEX = frozenset("0123456789abcdef")


def log_has(proc: ServiceProcess, text: str) -> bool:
    return text in Path(proc.log_path).read_text(errors="replace")


# -- values -------------------------------------------------------------------


VALUES = [
    None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "", "héllo ✓", b"", b"\x00\xff" * 100,
    [], [1, [2, [3, [4]]]], {"a": {"b": [b"x", None, 1.25]}}, {1: "int key", 2: [b"y"]},
    "x" * 100_000,
]


def test_values_round_trip(start_service, mesh_client: Client) -> None:
    start_service(ECHO)
    for value in VALUES:
        assert mesh_client.call("echo", "echo", [value]) == value
    nested = {"list": [1, "two", b"three", {"four": [None, 5.0]}], "bytes": b"\x01\x02"}
    assert mesh_client.call("echo", "echo", [], {"value": nested}) == nested
    assert mesh_client.call("echo", "echo", kwargs={"value": (1, 2)}) == [1, 2]  # arrays come back as lists
    echo = mesh_client.service("echo")
    assert echo.echo(1) == 1
    assert echo.echo(value=b"kw") == b"kw"


# -- errors -------------------------------------------------------------------


def test_unknown_service_fails_fast(start_service, mesh_client: Client) -> None:
    start_service(ECHO)  # the mesh is not empty: only the name is unknown
    started = time.monotonic()
    with pytest.raises(meshkit.NoInstanceError) as info:
        mesh_client.call("nosuch", "echo", [1], timeout=5)
    assert time.monotonic() - started < 0.3
    assert info.value.service == "nosuch"


def test_unknown_method(start_service, mesh_client: Client) -> None:
    start_service(ECHO)
    with pytest.raises(meshkit.UnknownMethodError) as info:
        mesh_client.call("echo", "nosuch")
    assert "nosuch" in str(info.value)
    assert info.value.code == "unknown_method"


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("echo", [], {}),  # missing argument, async handler
        ("echo", [1, 2], {}),  # too many
        ("echo", [1], {"value": 2}),  # given twice
        ("echo", [], {"nope": 1}),  # unexpected keyword
        ("whoami", [1], {}),  # plain handler (checked before it reaches the pool)
    ],
)
def test_bad_arguments(start_service, mesh_client: Client, method: str, args: list[object],
                       kwargs: dict[str, object]) -> None:
    start_service(ECHO)
    with pytest.raises(meshkit.BadArgumentsError):
        mesh_client.call("echo", method, args, kwargs)
    assert mesh_client.call("echo", "echo", [1]) == 1  # the instance is fine


def test_handler_error(start_service, mesh_client: Client) -> None:
    start_service(WORKER)
    with pytest.raises(meshkit.HandlerError) as info:
        mesh_client.call("worker", "fail", ["boom"])
    err = info.value
    assert err.remote_type == "ValueError"
    assert err.message == "boom"
    assert str(err) == "ValueError: boom"
    assert err.remote_traceback is None  # not in debug mode
    assert (err.service, err.method) == ("worker", "fail")


def test_handler_error_traceback_in_debug_mode(start_service, mesh_client: Client) -> None:
    start_service(WORKER, env={"MESHKIT_DEBUG": "1"})
    with pytest.raises(meshkit.HandlerError) as info:
        mesh_client.call("worker", "fail", ["boom"])
    tb = info.value.remote_traceback
    assert tb is not None
    assert "_raise_value_error" in tb and "ValueError: boom" in tb


# -- deadlines ------------------------------------------------------------------


def test_timeout_at_deadline_cancels_the_handler(start_service, mesh_client: Client) -> None:
    [echo] = start_service(ECHO)
    started = time.monotonic()
    with pytest.raises(meshkit.CallTimeoutError):
        mesh_client.call("echo", "sleep", [5.0], timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 0.9, elapsed
    # The server gave up too: the handler was cancelled at the same deadline.
    wait_until(lambda: log_has(echo, "sleep cancelled at its deadline"), 1.0,
               "the server to cancel the handler")
    assert mesh_client.call("echo", "sleep", [0.0], timeout=1) == echo.record.instance_id


def test_wait_for_an_instance_started_later(start_service, mesh_client: Client) -> None:
    with pytest.raises(meshkit.NoInstanceError):
        mesh_client.call("echo", "echo", [1])
    started = time.monotonic()
    with pytest.raises(meshkit.CallTimeoutError):
        mesh_client.call("echo", "echo", [1], timeout=0.3, wait=True)
    assert 0.28 <= time.monotonic() - started < 0.8
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(mesh_client.call, "echo", "echo", ["late"], timeout=20, wait=True)
        assert not waiting.done()
        start_service(ECHO)
        assert waiting.result(10) == "late"
    assert mesh_client.service("echo", wait=True).echo(2) == 2


def test_oversized_request_is_refused_by_the_client(start_service, mesh_settings: Settings) -> None:
    start_service(ECHO)
    with Client(mesh_settings.replace(max_message_size=4096)) as client:
        assert client.call("echo", "echo", [b"x" * 2000]) == b"x" * 2000
        with pytest.raises(meshkit.MessageTooLargeError):
            client.call("echo", "echo", [b"x" * 5000])
        with pytest.raises(meshkit.MessageTooLargeError):
            client.publish("echo.events", b"x" * 5000)
        assert client.call("echo", "echo", [1]) == 1


def test_deadline_crosses_hops(start_service, mesh_client: Client) -> None:
    [echo] = start_service(ECHO)
    start_service(RELAY)
    started = time.monotonic()
    with pytest.raises(meshkit.CallTimeoutError):
        mesh_client.call("relay", "sleep_via_echo", [5.0], timeout=0.6)
    assert time.monotonic() - started < 1.0
    # The inner call carried the outer deadline (relay set none of its own),
    # so echo stopped at about the same time.
    wait_until(lambda: log_has(echo, "sleep cancelled at its deadline"), 1.0,
               "echo to cancel the inner call")
    [outcome] = mesh_client.call("relay", "outcomes")
    assert outcome["outcome"] in ("CallTimeoutError", "CancelledError")
    assert outcome["elapsed"] < 0.9


# -- what crosses a hop -----------------------------------------------------------


def check_chain(spans: dict[str, dict[str, object]], mesh_client: Client) -> None:
    outer, inner = spans["outer"], spans["inner"]
    assert len(str(outer["trace_id"])) == 32 and set(str(outer["trace_id"])) <= HEX
    assert inner["trace_id"] == outer["trace_id"]
    assert inner["span_id"] != outer["span_id"]
    assert outer["parent_id"] is not None  # the client's own span
    # Between the two, the relay's client span of the inner call (docs/observability.md).
    [relay] = [r for r in mesh_client.instances() if r.service == "relay"]
    kept = mesh_client.call_instance(relay.instance_id, "_mesh.spans", trace_id=outer["trace_id"])
    [hop] = [s for s in kept if s["kind"] == "client"]
    assert hop["parent_id"] == outer["span_id"] and inner["parent_id"] == hop["span_id"]


@pytest.mark.parametrize("method", ["nested_span", "nested_span_plain"])
def test_trace_propagates(start_service, mesh_client: Client, method: str) -> None:
    start_service(RELAY)
    first = mesh_client.call("relay", method)
    check_chain(first, mesh_client)
    second = mesh_client.call("relay", method)
    check_chain(second, mesh_client)
    assert second["outer"]["trace_id"] != first["outer"]["trace_id"]  # one trace per root call


def test_meta_and_deadline_propagate(start_service, mesh_client: Client) -> None:
    start_service(RELAY)
    meta = {"conn": "c-42", "tenant": "acme"}
    spans = mesh_client.call("relay", "nested_span", meta=meta, timeout=2.0)
    assert spans["outer"]["meta"] == meta
    assert spans["inner"]["meta"] == meta
    assert 1.0 < spans["inner"]["remaining"] <= spans["outer"]["remaining"] <= 2.0
    assert mesh_client.call("relay", "span")["meta"] == {}


def test_plain_handler_does_not_block_other_calls(start_service, mesh_client: Client) -> None:
    start_service(WORKER)
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(mesh_client.call, "worker", "block", [1.5], timeout=5)
        wait_until(lambda: mesh_client.call("worker", "is_blocked"), 2.0, "block() to start")
        for _ in range(20):
            started = time.monotonic()
            assert mesh_client.call("worker", "ping") == "pong"
            assert mesh_client.call("worker", "is_blocked") is True  # another pool thread
            assert time.monotonic() - started < 0.75  # not queued behind the 1.5 s handler
        assert not blocked.done()
        assert blocked.result(5)


# -- the command line ----------------------------------------------------------------


def meshkit_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(settings_env(settings))
    return subprocess.run([sys.executable, "-m", "meshkit", *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_cli(start_service, mesh_settings: Settings, mesh_client: Client) -> None:
    [echo] = start_service(ECHO)
    assert echo.record is not None

    listed = meshkit_cli(mesh_settings, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)
    assert (record["service"], record["instance_id"], record["endpoint"], record["pid"]) == (
        "echo", echo.record.instance_id, echo.record.endpoint, echo.pid)
    assert record["state"] == "up" and "echo" in record["methods"]

    called = meshkit_cli(mesh_settings, "call", "echo", "echo", '{"a":1}')
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"a": 1}

    for args, code in ((("echo", "nosuch"), "unknown_method"), (("nosuch", "echo", "1"), "no_instance")):
        failed = meshkit_cli(mesh_settings, "call", *args)
        assert failed.returncode != 0
        assert failed.stdout == ""
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and f"[{code}]" in lines[0], failed.stderr

    published = meshkit_cli(mesh_settings, "publish", "echo.events", '{"x":1}')
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout) == {"delivered": 1}
    assert mesh_client.call("echo", "events") == [{"x": 1}]


def test_a_smaller_limit_on_the_receiver_is_respected_without_hurting_other_calls(
        start_service, mesh_client: Client) -> None:
    # The instance accepts 4 KiB; the caller's own limit is the 8 MiB default.
    start_service(ECHO, env={"MESHKIT_MAX_MESSAGE_SIZE": "4096"})
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(mesh_client.call, "echo", "sleep", [0.5])
        with pytest.raises(meshkit.MessageTooLargeError, match="4096"):
            mesh_client.call("echo", "echo", [b"x" * 20_000])
        # Nothing was sent, so the connection (and the other call on it) is intact.
        assert isinstance(in_flight.result(5), str)
    assert mesh_client.call("echo", "echo", [b"x" * 2000]) == b"x" * 2000


def test_a_call_in_flight_when_its_client_closes_fails_with_client_closed(
        start_service, mesh_settings: Settings) -> None:
    start_service(ECHO)
    client = Client(mesh_settings)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.call, "echo", "sleep", [3.0])
        wait_until(lambda: client.in_flight == 1, 5,
                   "the call to be in flight")
        client.close()
        # Not LostPeerError (the instance is fine) and not a retry on a closed client.
        with pytest.raises(meshkit.ClientClosedError):
            waiting.result(5)
    with pytest.raises(meshkit.ClientClosedError):
        client.call("echo", "echo", [1])


def test_call_instance_reaches_each_named_instance_and_only_it(start_service, mesh_client: Client) -> None:
    procs = start_service(ECHO, count=3)
    ids = [p.record.instance_id for p in procs]
    wait_until(lambda: {r.instance_id for r in mesh_client.instances("echo")} >= set(ids), 5,
               "the client to see every instance")
    for iid in ids:
        # whoami names the instance that served it: no other one ever does.
        assert {mesh_client.call_instance(iid, "whoami", timeout=5) for _ in range(5)} == {iid}
    assert mesh_client.call_instance(ids[0], "echo", value=[1, "x"]) == [1, "x"]
    with pytest.raises(meshkit.NoInstanceError, match="nope"):
        mesh_client.call_instance("nope", "whoami")
    with pytest.raises(meshkit.UnknownMethodError):
        mesh_client.call_instance(ids[1], "_mesh.nothing")
    assert mesh_client.in_flight == 0
