"""The clients of ``bench/rpc.py``, one per system, and the measurements that drive them.

Each client calls ``echo(value)`` on its system's server (:mod:`rpc_peers`
and ``rpc.BenchService``). An asyncio client offers ``call`` and
``pipelined``; a blocking one (:data:`BlockingClient`) offers ``call_sync``
and ``pipelined_sync``, and its measurements run in a worker thread so that
no hand-over to the event loop is counted. :class:`CpuMeter` reads the CPU
time of this process and of the server process around each measurement.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from rpc_peers import SUBJECT

import meshkit
from meshkit.config import Settings

SERVICE = "bench"
SMALL = b"0123456789abcdef"  # 16 bytes


class RawClient:
    """A zmq.asyncio DEALER speaking the raw side's protocol."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._id = 0

    async def call(self, value: Any) -> Any:
        self._id += 1
        await self.sock.send(msgpack.packb([self._id, "echo", [value]]))
        _, result = msgpack.unpackb(await self.sock.recv())
        return result

    async def pipelined(self, value: Any, n: int, inflight: int) -> None:
        """``n`` calls with a window of ``inflight``: one await per message sent or received."""
        sock, pack, unpack = self.sock, msgpack.packb, msgpack.unpackb
        sent = received = 0
        while sent < min(inflight, n):
            sent += 1
            await sock.send(pack([sent, "echo", [value]]))
        while received < n:
            unpack(await sock.recv())
            received += 1
            if sent < n:
                sent += 1
                await sock.send(pack([sent, "echo", [value]]))

    async def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class MeshkitClient:
    """:class:`meshkit.AsyncClient` calling ``bench.echo``."""

    def __init__(self, settings: Settings) -> None:
        self.client = meshkit.AsyncClient(settings)

    async def start(self) -> None:
        await self.client.start()
        await self.client.call(SERVICE, "echo", [SMALL], wait=True, timeout=20.0)

    async def call(self, value: Any) -> Any:
        return await self.client.call(SERVICE, "echo", [value])

    async def pipelined(self, value: Any, n: int, inflight: int) -> None:
        """``n`` calls made by ``inflight`` tasks, each awaiting one call at a time."""
        call = self.client.call
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(SERVICE, "echo", [value])

        await asyncio.gather(*(worker() for _ in range(min(inflight, n))))

    async def close(self) -> None:
        await self.client.close()


class BlockingRawClient:
    """A blocking DEALER; its measurements run in a thread of their own (``blocking``)."""

    blocking = True

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._id = 0

    def call_sync(self, value: Any) -> Any:
        self._id += 1
        self.sock.send(msgpack.packb([self._id, "echo", [value]]))
        return msgpack.unpackb(self.sock.recv())[1]

    def pipelined_sync(self, value: Any, n: int, inflight: int) -> None:
        sock, pack, unpack = self.sock, msgpack.packb, msgpack.unpackb
        sent = received = 0
        while sent < min(inflight, n):
            sent += 1
            sock.send(pack([sent, "echo", [value]]))
        while received < n:
            unpack(sock.recv())
            received += 1
            if sent < n:
                sent += 1
                sock.send(pack([sent, "echo", [value]]))

    async def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class BatchedClient:
    """A zmq.asyncio DEALER that drains every queued reply per wake-up."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.plain: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        self._id = 0

    async def call(self, value: Any) -> Any:
        self._id += 1
        self.plain.send(msgpack.packb([self._id, "echo", [value]]), zmq.NOBLOCK)
        while True:
            await self.sock.poll()
            try:
                return msgpack.unpackb(self.plain.recv(zmq.NOBLOCK))[1]
            except zmq.Again:
                continue

    async def pipelined(self, value: Any, n: int, inflight: int) -> None:
        plain, pack, unpack = self.plain, msgpack.packb, msgpack.unpackb
        sent = received = 0
        while sent < min(inflight, n):
            sent += 1
            plain.send(pack([sent, "echo", [value]]), zmq.NOBLOCK)
        while received < n:
            await self.sock.poll()
            while received < n:
                try:
                    unpack(plain.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                received += 1
                if sent < n:
                    sent += 1
                    plain.send(pack([sent, "echo", [value]]), zmq.NOBLOCK)

    async def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class NatsClient:
    """nats-py request/reply on :data:`SUBJECT`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Any = None
        self._id = 0

    async def start(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)

    async def call(self, value: Any) -> Any:
        self._id += 1
        reply = await self.nc.request(SUBJECT, msgpack.packb([self._id, "echo", [value]]), timeout=10)
        return msgpack.unpackb(reply.data)[1]

    async def pipelined(self, value: Any, n: int, inflight: int) -> None:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.call(value)

        await asyncio.gather(*(worker() for _ in range(min(inflight, n))))

    async def close(self) -> None:
        await self.nc.close()


class SyncMeshkitClient:
    """:class:`meshkit.Client` (blocking) calling ``bench.echo``; ``inflight`` threads share it."""

    blocking = True

    def __init__(self, settings: Settings, service: str) -> None:
        self.client = meshkit.Client(settings)
        self.service = service
        self.client.call(service, "echo", [b"warm"], wait=True, timeout=20.0)

    def call_sync(self, value: Any) -> Any:
        return self.client.call(self.service, "echo", [value])

    def pipelined_sync(self, value: Any, n: int, inflight: int) -> None:
        left = n
        lock = threading.Lock()

        def worker() -> None:
            nonlocal left
            while True:
                with lock:
                    if left <= 0:
                        return
                    left -= 1
                self.client.call(self.service, "echo", [value])

        with ThreadPoolExecutor(max_workers=inflight) as pool:
            for future in [pool.submit(worker) for _ in range(min(inflight, n))]:
                future.result()

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)


Client = RawClient | MeshkitClient | BatchedClient | NatsClient | BlockingRawClient | SyncMeshkitClient
BlockingClient = BlockingRawClient | SyncMeshkitClient


async def call_once(client: Client, value: Any) -> Any:
    if isinstance(client, BlockingClient):
        return await asyncio.to_thread(client.call_sync, value)
    return await client.call(value)


async def run_pipelined(client: Client, value: Any, n: int, inflight: int) -> None:
    if isinstance(client, BlockingClient):
        await asyncio.to_thread(client.pipelined_sync, value, n, inflight)
    else:
        await client.pipelined(value, n, inflight)


# -- measurements --------------------------------------------------------------


def _process_cpu_ns(pid: int) -> int | None:
    """CPU time used so far by every live thread of ``pid`` (Linux schedstat), or None."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total


class CpuMeter:
    """CPU microseconds per call of this (client) process and the server process.

    Wall-clock figures swing with whatever else the machine runs; CPU time
    per call barely does, so it is the steadier way to compare two builds.
    All threads count (libzmq's I/O thread, pyzmq's garbage-collector thread).
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start: tuple[int, int | None] = (0, None)
        self.client_us = self.server_us = float("nan")

    def start(self) -> None:
        self._start = (time.process_time_ns(), _process_cpu_ns(self.server_pid))

    def stop(self, calls: int) -> None:
        client0, server0 = self._start
        self.client_us = (time.process_time_ns() - client0) / calls / 1000
        server1 = _process_cpu_ns(self.server_pid)
        if server0 is not None and server1 is not None:
            self.server_us = (server1 - server0) / calls / 1000


async def measure_seq(client: Client, calls: int, warmup: int, cpu: CpuMeter) -> tuple[float, float]:
    """(p50, p99) in microseconds of ``calls`` sequential round trips.

    A blocking client's whole loop runs in one worker thread, so that no
    hand-over to the event loop is counted in its round trips.
    """
    if isinstance(client, BlockingClient):
        samples = await asyncio.to_thread(_seq_blocking, client, calls, warmup, cpu)
    else:
        for _ in range(warmup):
            await client.call(SMALL)
        samples = []
        clock = time.perf_counter_ns
        cpu.start()
        for _ in range(calls):
            t0 = clock()
            await client.call(SMALL)
            samples.append(clock() - t0)
        cpu.stop(calls)
    samples.sort()
    return _percentile(samples, 50) / 1000, _percentile(samples, 99) / 1000


def _seq_blocking(client: BlockingClient, calls: int, warmup: int, cpu: CpuMeter) -> list[int]:
    for _ in range(warmup):
        client.call_sync(SMALL)
    samples = []
    clock = time.perf_counter_ns
    cpu.start()
    for _ in range(calls):
        t0 = clock()
        client.call_sync(SMALL)
        samples.append(clock() - t0)
    cpu.stop(calls)
    return samples


async def measure_throughput(client: Client, value: bytes, calls: int, inflight: int,
                             cpu: CpuMeter) -> float:
    """Completed calls per second with ``inflight`` in flight."""
    await run_pipelined(client, value, min(calls, 4 * inflight), inflight)  # warm the window
    cpu.start()
    t0 = time.perf_counter()
    await run_pipelined(client, value, calls, inflight)
    elapsed = time.perf_counter() - t0
    cpu.stop(calls)
    return calls / elapsed


def _percentile(sorted_samples: list[int], pct: float) -> float:
    k = (len(sorted_samples) - 1) * pct / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (k - lo)
