"""What HTTP and WebSocket cost per request, beside the TCP listener, on one gateway.

Usage (from the project root)::

    .venv/bin/python bench/edge_http.py             # a table (about half a minute)
    .venv/bin/python bench/edge_http.py --quick     # a smoke run
    .venv/bin/python bench/edge_http.py --json      # one JSON object on stdout
    .venv/bin/python bench/edge.py --web [...]      # the same, from the edge benchmark

It starts a private ``redis-server``, one ``echo`` backend and one gateway
with both listeners (``stratum``: newline-delimited JSON over TCP; ``web``:
HTTP and WebSocket, aiohttp), and calls ``echo.echo`` of a 16-byte string
straight at the gateway's ports (no HAProxy: the listener's own cost) over
three paths:

``tcp``   JSON lines on one TCP connection (asyncio streams)
``http``  ``POST /rpc`` on one kept-alive connection (aiohttp's client)
``ws``    text messages on one WebSocket (the ``websockets`` library)

``seq`` is one request at a time (p50/p99 of the round trip); ``conc`` is
``--conns`` clients of the path at once, each with one request in flight
(requests per second). ``gw cpu/req`` is the gateway process's user + system
CPU (``/proc/PID/stat``) per request over the measured part: what the
listener adds is its difference from ``tcp``'s. Paths alternate between
``--repeat`` runs; medians are reported, with the load average at start and
end. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_stack import cpu_seconds

from meshkit.testing import RedisServer, ServiceProcess, test_settings

PAYLOAD = "0123456789abcdef"
PATHS = ("tcp", "http", "ws")
Call = Callable[[int], Awaitable[None]]


def _request(i: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": "echo.echo", "params": [PAYLOAD]}).encode()


class Clients:
    """One client of each path; ``open(path)`` returns its call function."""

    def __init__(self, tcp: str, web: str) -> None:
        self.tcp, self.web = tcp, web
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    async def open(self, path: str) -> Call:
        if path == "tcp":
            host, port = self.tcp.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            self._closers.append(_closer(writer))

            async def tcp(i: int) -> None:
                writer.write(_request(i) + b"\n")
                _check(await reader.readline(), i)
            return tcp
        if path == "http":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            self._closers.append(session.close)
            url = f"http://{self.web}/rpc"

            async def http(i: int) -> None:
                async with session.post(url, data=_request(i),
                                        headers={"Content-Type": "application/json"}) as r:
                    _check(await r.read(), i)
            return http
        ws = await connect(f"ws://{self.web}/ws", compression=None)
        self._closers.append(ws.close)

        async def websocket(i: int) -> None:
            await ws.send(_request(i).decode())
            _check(await ws.recv(), i)
        return websocket

    async def close(self) -> None:
        for close in self._closers:
            await close()
        self._closers.clear()


def _closer(writer: asyncio.StreamWriter) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        writer.close()
        await writer.wait_closed()
    return close


def _check(raw: bytes | str, i: int) -> None:
    doc = json.loads(raw)
    if doc.get("id") != i or doc.get("result") != PAYLOAD:
        raise RuntimeError(f"unexpected answer {doc!r}")


async def seq(clients: Clients, path: str, calls: int, warmup: int, pid: int) -> dict[str, float]:
    call = await clients.open(path)
    for i in range(warmup):
        await call(i)
    times = []
    cpu = cpu_seconds(pid)
    for i in range(calls):
        t = time.perf_counter()
        await call(i)
        times.append(time.perf_counter() - t)
    cpu = cpu_seconds(pid) - cpu
    await clients.close()
    times.sort()
    return {"p50_us": round(times[len(times) // 2] * 1e6, 1),
            "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
            "gw_cpu_us": round(cpu / calls * 1e6, 1)}


async def conc(clients: Clients, path: str, conns: int, calls: int, pid: int) -> dict[str, float]:
    callers = [await clients.open(path) for _ in range(conns)]
    for call in callers:
        await call(0)
    per = calls // conns

    async def run(call: Call) -> None:
        for i in range(per):
            await call(i)
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in callers))
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu
    await clients.close()
    return {"rps": round(per * conns / elapsed), "gw_cpu_us": round(cpu / (per * conns) * 1e6, 1)}


def _median(docs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(d[k] for d in docs), 1) for k in docs[0]}


async def measure(args: argparse.Namespace, clients: Clients, pid: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {"seq": {}, "conc": {}}
    for r in range(args.repeat):
        order = PATHS[r % 3:] + PATHS[:r % 3]
        for path in order:
            runs["seq"].setdefault(path, []).append(await seq(clients, path, args.calls, args.warmup, pid))
        for path in order:
            runs["conc"].setdefault(path, []).append(
                await conc(clients, path, args.conns, args.conc_calls, pid))
    return {kind: {p: _median(d) for p, d in by.items()} for kind, by in runs.items()}


def format_table(s: dict[str, Any]) -> str:
    base = s["seq"]["tcp"]
    lines = [f"{'path':<6} {'seq p50 us':>10} {'p99 us':>8} {'gw cpu/req':>10} {'+ vs tcp':>8}"
             f"   {'conc req/s':>10} {'gw cpu/req':>10}"]
    for path in PATHS:
        q, c = s["seq"][path], s["conc"][path]
        lines.append(f"{path:<6} {q['p50_us']:>10} {q['p99_us']:>8} {q['gw_cpu_us']:>10} "
                     f"{q['gw_cpu_us'] - base['gw_cpu_us']:>+8.1f}   {c['rps']:>10} {c['gw_cpu_us']:>10}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="HTTP and WebSocket beside TCP, per request, on one gateway.")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--calls", type=int, default=2000, help="sequential requests per path and run")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--conns", type=int, default=16, help="clients at once in the concurrent part")
    p.add_argument("--conc-calls", type=int, default=8000, help="requests per path and run, concurrent")
    p.add_argument("--quick", action="store_true", help="a smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeat, args.calls, args.warmup, args.conc_calls = 1, 300, 50, 1600
    load_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="meshkit-edge-http-"))
    redis = RedisServer(str(workdir))
    procs: list[ServiceProcess] = []
    try:
        redis.start()
        settings = test_settings(redis.url, log_level="WARNING")
        env = {"MESHKIT_GATEWAY_WEB_LISTENER": "web", "MESHKIT_GATEWAY_SERVICES": "echo",
               "MESHKIT_GATEWAY_REQUEST_RATE": "0", "MESHKIT_GATEWAY_CONNECT_RATE": "0"}
        procs = [ServiceProcess("services.echo:Echo", settings, log_dir=str(workdir)),
                 ServiceProcess("meshkit.gateway:Gateway", settings, env=env, log_dir=str(workdir))]
        for proc in procs:
            proc.start(60)
        gateway = procs[1]
        assert gateway.record is not None
        clients = Clients(gateway.record.listeners["stratum"], gateway.record.listeners["web"])
        summary = asyncio.run(measure(args, clients, gateway.pid))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        redis.stop()
    machine = {"nproc": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load_start],
               "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    if args.json:
        print(json.dumps({**summary, "machine": machine, "config": vars(args)}, indent=2))
    else:
        print(f"{machine['nproc']} CPUs; load {machine['loadavg_at_start']} -> {machine['loadavg_at_end']}; "
              f"medians of {args.repeat} runs; {args.calls} sequential and {args.conc_calls} concurrent "
              f"requests ({args.conns} clients) per path and run")
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
