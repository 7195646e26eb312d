"""The client side of ``bench/edge.py``, run in processes of its own (never in a server's).

``python bench/edge_clients.py ROLE ...`` connects, warms up, prints ``ready``
and waits for ``go`` on stdin, so that the parent can read every process's
CPU counters right before and right after the measured part. It then prints
its result as one JSON line, and exits at the next line (or end) of stdin.
Roles:

``seq``        one connection, one request at a time (``--target lines`` speaks the
               gateway's JSON lines to ``--addr``; ``--target mesh`` calls
               ``echo.echo`` with :class:`meshkit.AsyncClient`, settings from
               ``MESHKIT_*``); result: per-call round-trip percentiles
``pipelined``  ``--conns`` connections, each keeping ``--inflight`` requests in flight,
               ``--calls`` requests in all; result: calls per second and percentiles
``fanout``     ``--conns`` connections subscribed to ``--topic``; after ``go`` it prints
               ``{"seq": i, "last": t}`` once every connection has push ``i`` (``t``: the
               ``time.monotonic()`` of the last arrival; the clock is the machine's, so
               the parent compares it with its own), and on ``done`` its totals
``hold``       ``fanout`` for the scale run (:mod:`edge_scale`): the connections are opened
               at ``--connect-rate`` a second (a paced ramp), and after ``go`` the first
               ``--requesters`` of them each send ``echo.echo`` at ``--request-rate`` a
               second until ``done``; it counts answers, wrong answers and every
               connection that ended without being closed here (``disconnects``)

Every request is ``echo.echo`` of a 16-byte string. No role asserts
anything; a wrong answer is counted in ``errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from typing import Any

PAYLOAD = "0123456789abcdef"  # 16 bytes
MAX_PARTIAL = 1 << 16  # bytes of an unfinished line a fan-out client keeps
_SEQ = re.compile(rb'"seq":\s*(\d+)')
_dumps = json.JSONEncoder(separators=(",", ":")).encode


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """``p50_us`` and ``p99_us`` of round trips given in nanoseconds (nearest rank)."""
    if not samples_ns:
        return {"p50_us": float("nan"), "p99_us": float("nan")}
    ordered = sorted(samples_ns)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50_us": round(pick(0.50), 1), "p99_us": round(pick(0.99), 1)}


def _request(rid: int, method: str = "echo.echo", params: Any = None) -> bytes:
    return _dumps({"jsonrpc": "2.0", "method": method,
                   "params": [PAYLOAD] if params is None else params, "id": rid}).encode() + b"\n"


def _addr(args: argparse.Namespace, number: int) -> tuple[str, int]:
    """The address connection ``number`` goes to (``--addr`` round robin)."""
    host, port = args.addr[number % len(args.addr)].rsplit(":", 1)
    return host, int(port)


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _ready_then_go() -> None:
    print("ready", flush=True)
    if (await _stdin_line()).strip() != "go":
        raise SystemExit("expected 'go' on stdin")


class Lines:
    """One JSON-lines connection with request ids and an ``errors`` count."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.next_id = 0
        self.errors = 0

    @classmethod
    async def open(cls, host: str, port: int) -> Lines:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), 30)
        return cls(reader, writer)

    async def call(self, method: str = "echo.echo", params: Any = None) -> Any:
        self.next_id += 1
        self.writer.write(_request(self.next_id, method, params))
        while True:
            doc = json.loads(await self.reader.readline())
            if doc.get("id") == self.next_id:
                if "result" not in doc:
                    self.errors += 1
                return doc.get("result")


async def run_seq(args: argparse.Namespace) -> dict[str, Any]:
    call: Any
    errors = Counter[str]()
    if args.target == "mesh":
        import meshkit

        client = meshkit.AsyncClient(meshkit.Settings.load())
        await client.start()
        await client.call("echo", "echo", [PAYLOAD], wait=True, timeout=30)

        async def call() -> Any:
            return await client.call("echo", "echo", [PAYLOAD])
    else:
        conn = await Lines.open(*_addr(args, 0))

        async def call() -> Any:
            return await conn.call()
    for _ in range(args.warmup):
        await call()
    await _ready_then_go()
    samples: list[int] = []
    clock = time.perf_counter_ns
    started = time.perf_counter()
    for _ in range(args.calls):
        t0 = clock()
        if await call() != PAYLOAD:
            errors["wrong_answer"] += 1
        samples.append(clock() - t0)
    elapsed = time.perf_counter() - started
    if args.target == "mesh":
        await client.close()
    return {"calls": args.calls, "seconds": elapsed, **percentiles(samples), "errors": sum(errors.values())}


async def run_pipelined(args: argparse.Namespace) -> dict[str, Any]:
    conns = [await Lines.open(*_addr(args, i)) for i in range(args.conns)]
    for conn in conns:
        await conn.call()
    await _ready_then_go()
    per_conn = max(1, args.calls // args.conns)
    samples: list[int] = []
    errors = 0

    async def drive(conn: Lines) -> None:
        nonlocal errors
        sent_at: dict[int, int] = {}
        clock = time.perf_counter_ns
        sent = done = 0
        while sent < min(args.inflight, per_conn):
            sent += 1
            sent_at[sent] = clock()
            conn.writer.write(_request(sent))
        while done < per_conn:
            doc = json.loads(await conn.reader.readline())
            t0 = sent_at.pop(doc.get("id"), None)
            if t0 is None:
                continue  # a notification or an unmatched answer
            samples.append(clock() - t0)
            done += 1
            if doc.get("result") != PAYLOAD:
                errors += 1
            if sent < per_conn:
                sent += 1
                sent_at[sent] = clock()
                conn.writer.write(_request(sent))

    started = time.perf_counter()
    await asyncio.gather(*(drive(c) for c in conns))
    elapsed = time.perf_counter() - started
    total = per_conn * len(conns)
    return {"calls": total, "seconds": elapsed, "calls_s": total / elapsed, **percentiles(samples),
            "errors": errors}


class PushTally:
    """Arrivals of each push over every connection of this process."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.counts: Counter[int] = Counter()

    def arrived(self, seq: int) -> None:
        self.counts[seq] += 1
        if self.counts[seq] == self.expected:  # the last connection of this process has it
            print(_dumps({"seq": seq, "last": time.monotonic()}), flush=True)


class Subscriber(asyncio.Protocol):
    """One fan-out connection as a bare protocol, the cheapest way Python has to read pushes.

    On a 2-core machine the clients share the cores with the servers they
    measure, so every microsecond they spend per push is a microsecond less
    for the servers: no StreamReader, no task, no JSON parse per push (the
    sequence number is found with a regular expression).
    """

    def __init__(self, tally: PushTally, topic: str) -> None:
        self.tally = tally
        self.topic = topic
        self.buffer = b""
        self.subscribed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(_request(1, "mesh.subscribe", [self.topic]))

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        if len(self.buffer) > MAX_PARTIAL and self.transport is not None:
            self.transport.close()  # not a line protocol any more; do not buffer without a bound
        for line in lines:
            found = _SEQ.search(line) if b'"method"' in line else None
            if found is not None:
                self.tally.arrived(int(found.group(1)))
            elif not self.subscribed.done():
                self.subscribed.set_result(b'"result"' in line)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"closed before subscribing: {exc}"))


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    tally = PushTally(args.conns)
    gate = asyncio.Semaphore(100)  # connect in waves: a SYN flood of 5,000 overflows backlogs
    loop = asyncio.get_running_loop()

    async def connect(number: int) -> Subscriber:
        async with gate:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: Subscriber(tally, args.topic), *_addr(args, number)), 30)
            await asyncio.wait_for(proto.subscribed, 30)
            return proto

    conns = await asyncio.gather(*(connect(i) for i in range(args.conns)))
    errors = sum(not c.subscribed.result() for c in conns)
    await _ready_then_go()
    while (line := await _stdin_line()) and line.strip() != "done":
        pass  # end of stdin (the parent is gone) counts as done
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return {"conns": len(conns), "received": sum(tally.counts.values()), "errors": errors,
            "per_seq": {str(k): v for k, v in sorted(tally.counts.items())}}


class Holder(Subscriber):
    """A fan-out connection that may also send requests and notices its own end."""

    def __init__(self, tally: PushTally, topic: str, hold: HoldTally) -> None:
        super().__init__(tally, topic)
        self.hold = hold
        self.sent_at: dict[int, int] = {}
        self.next_id = 1  # 1 was the subscribe
        self.closing = False

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        if len(self.buffer) > MAX_PARTIAL and self.transport is not None:
            self.transport.close()
        for line in lines:
            if b'"method"' in line:
                found = _SEQ.search(line)
                if found is not None:
                    self.tally.arrived(int(found.group(1)))
                continue
            if not self.subscribed.done():
                self.subscribed.set_result(b'"result"' in line)
                continue
            self.answered(line)

    def answered(self, line: bytes) -> None:
        try:
            doc = json.loads(line)
        except ValueError:
            self.hold.errors["bad_line"] += 1
            return
        sent = self.sent_at.pop(doc.get("id"), None) if isinstance(doc, dict) else None
        if sent is None:
            self.hold.errors["unexpected_line"] += 1
            return
        self.hold.latencies.append(time.perf_counter_ns() - sent)
        if doc.get("result") != PAYLOAD:
            self.hold.errors["wrong_answer"] += 1

    def request(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.next_id += 1
        self.sent_at[self.next_id] = time.perf_counter_ns()
        self.hold.sent += 1
        self.transport.write(_request(self.next_id))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closing:
            self.hold.disconnects += 1


class HoldTally:
    """The ``hold`` role's counts over every connection of the process."""

    def __init__(self) -> None:
        self.sent = 0
        self.latencies: list[int] = []
        self.errors: Counter[str] = Counter()
        self.disconnects = 0


async def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    tally, hold = PushTally(args.conns), HoldTally()
    loop = asyncio.get_running_loop()
    # The ramp starts at --start-at (the machine's monotonic clock, the loop's clock
    # here), so that no client connects while the other client processes still start.
    started = max(loop.time(), args.start_at)
    gate = asyncio.Semaphore(50)

    async def connect(number: int) -> Holder:
        # A paced ramp: connection ``number`` starts at number / rate seconds.
        await asyncio.sleep(max(0.0, started + number / args.connect_rate - loop.time()))
        async with gate:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: Holder(tally, args.topic, hold), *_addr(args, number)), 60)
            await asyncio.wait_for(proto.subscribed, 60)
            return proto

    conns = await asyncio.gather(*(connect(i) for i in range(args.conns)))
    ramp_s = loop.time() - started
    errors = sum(not c.subscribed.result() for c in conns)
    lost_in_ramp = hold.disconnects
    await _ready_then_go()
    stop = asyncio.Event()

    async def drive(conn: Holder) -> None:
        await asyncio.sleep(random.random() / args.request_rate)  # spread the phases
        while not stop.is_set():
            conn.request()
            await asyncio.sleep(1.0 / args.request_rate)

    drivers = [asyncio.create_task(drive(c)) for c in conns[:args.requesters]]
    while (line := await _stdin_line()) and line.strip() != "done":
        pass
    stop.set()
    await asyncio.gather(*drivers)
    deadline = loop.time() + 15
    while any(c.sent_at for c in conns) and loop.time() < deadline:
        await asyncio.sleep(0.05)  # the last answers
    unanswered = sum(len(c.sent_at) for c in conns)
    disconnects = hold.disconnects
    for conn in conns:
        conn.closing = True
        if conn.transport is not None:
            conn.transport.close()
    return {"conns": len(conns), "ramp_s": round(ramp_s, 2), "received": sum(tally.counts.values()),
            "errors": errors + sum(hold.errors.values()), "error_kinds": dict(hold.errors),
            "disconnects": disconnects, "disconnects_in_ramp": lost_in_ramp, "requests": hold.sent,
            "answered": len(hold.latencies), "unanswered": unanswered,
            "latency_ns": hold.latencies, "per_seq": {str(k): v for k, v in sorted(tally.counts.items())}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Client processes of bench/edge.py.")
    p.add_argument("role", choices=("seq", "pipelined", "fanout", "hold"))
    p.add_argument("--target", choices=("lines", "mesh"), default="lines")
    p.add_argument("--addr", action="append", default=[],
                   help="host:port to connect to; repeat it to spread connections round robin")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--inflight", type=int, default=8)
    p.add_argument("--topic", default="bench.tick")
    p.add_argument("--connect-rate", type=float, default=50.0, help="hold: new connections a second")
    p.add_argument("--start-at", type=float, default=0.0, help="hold: time.monotonic() to begin at")
    p.add_argument("--requesters", type=int, default=0, help="hold: connections that send requests")
    p.add_argument("--request-rate", type=float, default=1.0, help="hold: requests a second each")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"seq": run_seq, "pipelined": run_pipelined, "fanout": run_fanout, "hold": run_hold}[args.role]
    result = asyncio.run(run(args))
    print(_dumps({"result": result}), flush=True)
    sys.stdin.readline()  # stay alive until the parent has read this process's CPU counters
    return 0


if __name__ == "__main__":
    sys.exit(main())
