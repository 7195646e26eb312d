"""The gateway's push fan-out at a few thousand connections, and its state when its record lapses.

Real processes: redis-server, a gateway (or two), the probe backend; the
clients are plain TCP sockets in this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from lineclient import LineClient, line_clients

from meshkit import AsyncClient, Client, Settings
from meshkit.gateway import push_to_connection
from meshkit.testing import RedisServer, ServiceProcess, wait_until

pytestmark = pytest.mark.integration

GATEWAY = "meshkit.gateway:Gateway"
PROBE = "tests.integration.services.gwprobe:GatewayProbe"
StartService = Callable[..., list[ServiceProcess]]
CONNECTIONS = 5000  # about what each of two gateways held in the 10,000-connection run
PUSHES = 6


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def start_gateway(start_service: StartService, **options: Any) -> tuple[ServiceProcess, str]:
    env = {f"MESHKIT_GATEWAY_{k.upper()}": str(v) for k, v in options.items()}
    [gw] = start_service(GATEWAY, env=env)
    assert gw.record is not None
    return gw, gw.record.listeners["stratum"]


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open(address: str, count: int) -> list[Stream]:
    host, port = address.rsplit(":", 1)
    streams: list[Stream] = []
    for start in range(0, count, 200):  # in batches: the accept backlog is finite
        streams += await asyncio.gather(*(asyncio.open_connection(host, int(port))
                                          for _ in range(min(200, count - start))))
    return streams


async def _ask(stream: Stream, method: str, params: Any = None) -> dict[str, Any]:
    reader, writer = stream
    writer.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
                            ).encode() + b"\n")
    line = await asyncio.wait_for(reader.readline(), 30)
    doc: dict[str, Any] = json.loads(line)
    return doc


async def _pushes(stream: Stream, count: int) -> list[Any]:
    reader, _ = stream
    return [json.loads(await asyncio.wait_for(reader.readline(), 60))["params"] for _ in range(count)]


class Pinger(threading.Thread):
    """Sends ``mesh.ping`` as HAProxy's health check does, every 20 ms, from its own thread and socket.

    Its own thread, so the round trips measure the gateway, not this
    process's event loop reading thousands of pushes.
    """

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.times: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        reader = self.sock.makefile("rb")
        while not self.stop.is_set():
            began = time.monotonic()
            self.sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "mesh.ping"}\n')
            assert "result" in json.loads(reader.readline())
            self.times.append(time.monotonic() - began)
            self.stop.wait(0.02)
        self.sock.close()


def test_pings_are_answered_promptly_and_pushes_stay_in_order_during_a_large_fan_out(
    start_service: StartService, mesh_settings: Settings,
) -> None:
    gw, address = start_gateway(start_service, topics="jobs.*", max_connections=CONNECTIONS + 10,
                                max_output=4 * 1024 * 1024)
    assert gw.record is not None
    blob = "x" * 16000

    async def main() -> tuple[list[float], list[int]]:
        streams = await _open(address, CONNECTIONS)
        hello = await asyncio.gather(*(_ask(s, "mesh.hello") for s in streams[:4]))
        await asyncio.gather(*(_ask(s, "mesh.subscribe", ["jobs.notify"]) for s in streams))
        pinger = Pinger(address)
        singles = [h["result"]["connection"] for h in hello]
        async with AsyncClient(mesh_settings) as mesh:
            # Read as the pushes come (the gateway drops clients that do not read).
            receiving = asyncio.gather(*(_pushes(s, PUSHES * (2 if i < 4 else 1))
                                         for i, s in enumerate(streams)))
            pinger.start()
            reached: list[int] = []
            # Topic pushes and per-connection pushes, interleaved, from one sender.
            for k in range(PUSHES):
                reached.append(await mesh.publish("jobs.notify", {"k": k, "blob": blob}, timeout=5))
                for conn_id in singles:
                    assert await push_to_connection(mesh, conn_id, "jobs.single", {"k": k}, timeout=5)
            received = await receiving
            pinger.stop.set()
            await asyncio.to_thread(pinger.join, 10)
        for i, got in enumerate(received):
            if i < 4:  # publish k, then its delivery k, for every k
                assert [(p["k"], "blob" in p) for p in got] == [
                    (k, topic) for k in range(PUSHES) for topic in (True, False)], i
            else:
                assert [p["k"] for p in got] == list(range(PUSHES)), i
        for _, writer in streams:
            writer.close()
        return pinger.times, reached

    times, reached = asyncio.run(main())
    assert reached == [1] * PUSHES  # every publish counted the gateway, though fan-outs took longer
    assert len(times) >= 5 and max(times) < 0.3, (max(times), len(times), os.getloadavg())


def test_a_gateway_whose_record_lapsed_keeps_its_clients_state(
    start_service: StartService, clients: Callable[[str], LineClient], mesh_client: Client,
    mesh_settings: Settings, redis_server: RedisServer,
) -> None:
    start_service(PROBE)
    late, address = start_gateway(start_service)
    start_gateway(start_service)  # the other gateway, whose sweep used to delete the state
    client = clients(address)
    conn_id = client.call("mesh.hello")["result"]["connection"]
    assert client.call("gwprobe.remember", ["worker", "w1"])["result"] == {"worker": "w1", "calls": "1"}
    db = redis_server.client()
    key = f"{mesh_settings.namespace}:conn:{conn_id}"
    assert db.exists(key)
    assert late.record is not None
    record = late.record.instance_id
    ttl = mesh_settings.ttl
    stopped = time.monotonic()
    os.kill(late.pid, signal.SIGSTOP)  # its heartbeat stops: the record expires
    try:
        wait_until(lambda: all(r.instance_id != record for r in mesh_client.instances("gateway")),
                   2 * ttl + 5, "the stopped gateway's record to expire")
        # Not a readiness wait but the scenario. The record expires within ttl
        # of the stop; the other gateway sweeps every ttl, so two sweeps have
        # missed it (the old rule's death) by 3 ttl after the stop. The rule by
        # time deletes no sooner than ttl - heartbeat + 3 ttl after it.
        time.sleep(max(0.0, stopped + 3 * ttl + 0.8 - time.monotonic()))
    finally:
        os.kill(late.pid, signal.SIGCONT)
    # The same connection, its state whole: the count goes on from 1.
    answer = client.call("gwprobe.remember", ["worker", "w2"])
    assert answer.get("result") == {"worker": "w2", "calls": "2"}, answer
    assert db.hget(key, "_gateway") == record.encode()
    db.close()
