"""``trace-a`` calls ``trace-b``, which records a user span; handlers to hold, fail, be slow and flood spans."""

from __future__ import annotations

import asyncio
import threading

import meshkit


class TraceA(meshkit.Service):
    name = "trace-a"

    @meshkit.rpc
    async def order(self, customer: str) -> str:
        return str(await self.service("trace-b").lookup(customer))


class TraceB(meshkit.Service):
    name = "trace-b"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.async_gate = asyncio.Event()

    @meshkit.rpc
    async def lookup(self, customer: str) -> str:
        with self.span("sql", query=f"select * from orders where customer = '{customer}'") as span:
            await asyncio.sleep(0.002)  # stands in for the database round trip
            span.set("rows", 3)
        return f"found:{customer}"

    @meshkit.rpc
    async def fail(self, why: str) -> None:
        raise ValueError(why)

    @meshkit.rpc
    async def slow(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @meshkit.rpc
    def block(self) -> str:
        """A plain handler holding its thread until :meth:`release`."""
        self.gate.wait(30)
        return "unblocked"

    @meshkit.rpc
    async def hold(self) -> str:
        """An async handler held until a push on ``trace-b.release`` (pushes are served while draining)."""
        await asyncio.wait_for(self.async_gate.wait(), 30)
        return "released"

    @meshkit.rpc
    async def release(self) -> None:
        self.gate.set()

    @meshkit.subscribe("trace-b.release")
    async def on_release(self, payload: object) -> None:
        self.async_gate.set()

    @meshkit.rpc
    async def flood(self, spans: int, size: int) -> int:
        """Record ``spans`` user spans of ``size``-character attributes (the buffer must stay bounded)."""
        text = "q" * size
        for n in range(spans):
            with self.span("flood", query=text, n=n):
                pass
            if n % 1000 == 0:
                await asyncio.sleep(0)
        return spans

    @meshkit.rpc
    async def rss_kib(self) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")
