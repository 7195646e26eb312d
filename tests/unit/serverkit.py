"""A :class:`~meshkit.server.Server` driven in-process: frames in, answers captured.

The server's ROUTER is created but never bound (no network); its pump is
replaced by one that records what the server sends. Tests feed frames to
``server._on_message`` (what the real pump calls per message) inside an
event loop and read the answers back decoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import zmq

from meshkit import wire
from meshkit.config import Settings
from meshkit.handlers import HandlerTable, rpc, subscribe
from meshkit.metrics import Metrics
from meshkit.server import Server


class Probe:
    """The service under test: quick, gated and failing handlers."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.pushed: list[Any] = []

    @rpc
    async def echo(self, value: Any) -> Any:
        return value

    @rpc
    async def wait(self, value: Any = None) -> str:
        await self.gate.wait()
        return "done"

    @rpc
    def plain(self, value: Any) -> Any:
        return value

    @rpc
    async def fail(self, text: str) -> None:
        raise ValueError(text)

    @subscribe("jobs.*")
    async def on_job(self, payload: Any) -> None:
        await self.gate.wait()
        self.pushed.append(len(payload) if isinstance(payload, (bytes, str)) else payload)


class FakePump:
    """Stands in for the server's SocketPump: records every message sent."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.joined: list[list[bytes]] = []  # those queued to be batched (wire.FEATURE_BATCH)

    def send(self, frames: list[bytes]) -> bool:
        self.sent.append(frames)
        return True

    def send_soon(self, frames: list[bytes], batch: bool = True, join: bool = False) -> None:
        self.sent.append(frames)  # recorded at once: the tests read answers as they are made
        if join:
            self.joined.append(frames)

    def flush(self) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@contextmanager
def probe_server(**overrides: Any) -> Iterator[tuple[Server, Probe, FakePump]]:
    """A server for a :class:`Probe` named ``probe``, with settings ``overrides``."""
    probe = Probe()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    executor = ThreadPoolExecutor(2)
    server = Server("probe", HandlerTable.collect(probe), Settings(**overrides), ctx, executor, Metrics("", "", ""))
    pump = FakePump()
    server.pump = pump  # type: ignore[assignment]
    try:
        yield server, probe, pump
    finally:
        for task in server._tasks:
            task.cancel()
        server.sock.close(linger=0)
        ctx.term()
        executor.shutdown(wait=True)


def call(id: int, method: str, *args: Any, target: str = "probe", timeout_ms: int | None = 5000) -> list[bytes]:
    return wire.encode_call(id, target, method, args, {}, timeout_ms, None, None)


def push(id: int, topic: str, payload: Any) -> list[bytes]:
    return wire.encode_push(id, topic, payload, 5000, None, None)


def answers(pump: FakePump, identity: bytes | None = None) -> list[tuple[wire.Header, Any]]:
    """Every answer sent so far (to ``identity`` only, if given), decoded."""
    out = []
    for frames in pump.sent:
        if identity is None or frames[0] == identity:
            assert len(frames) == 3, frames
            out.append((wire.decode_header(frames[1]), wire.unpack(frames[2])))
    return out


async def settle(server: Server, timeout: float = 5.0) -> None:
    """Let every task the server started finish (handlers must not be gated by then)."""
    for _ in range(3):
        await asyncio.sleep(0)
    if server._tasks:
        await asyncio.wait_for(asyncio.gather(*server._tasks, return_exceptions=True), timeout)
