"""A three-hop chain for cancellation tests: ``chain-a`` → ``chain-b`` → ``chain-c``.

Each hop appends ``<tag> <hop> <event> <monotonic time>`` to the file named by
``$CHAIN_LOG`` when it starts and when it sees its cancellation (a
``CancelledError`` in an async handler, ``current_call().cancelled`` in the
plain ``chain-c.grind``). ``time.monotonic`` is the machine's one
``CLOCK_MONOTONIC``, so the test compares the lines of every process with
its own readings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import meshkit

from .marks import append_mark


def mark(tag: str, hop: str, event: str) -> None:
    append_mark("CHAIN_LOG", tag, hop, event)


async def marked(tag: str, hop: str, call: Callable[[], Awaitable[object]]) -> str:
    """``call()``'s result as text, with this hop's ``started`` mark before and ``cancelled`` if cancelled."""
    mark(tag, hop, "started")
    try:
        return str(await call())
    except asyncio.CancelledError:
        mark(tag, hop, "cancelled")
        raise


class ChainA(meshkit.Service):
    name = "chain-a"

    @meshkit.rpc
    async def begin(self, tag: str, leaf: str) -> str:
        return await marked(tag, "a", lambda: self.service("chain-b").relay(tag, leaf))


class ChainB(meshkit.Service):
    name = "chain-b"

    @meshkit.rpc
    async def relay(self, tag: str, leaf: str) -> str:
        return await marked(tag, "b", lambda: self.client.call("chain-c", leaf, [tag]))


class ChainC(meshkit.Service):
    name = "chain-c"

    @meshkit.rpc
    async def work(self, tag: str) -> str:
        """Works (in small steps) until cancelled or 10 s have passed."""
        mark(tag, "c", "started")
        try:
            for _ in range(2000):
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            mark(tag, "c", "cancelled")
            raise
        mark(tag, "c", "finished")
        return "finished"

    @meshkit.rpc
    def grind(self, tag: str) -> str:
        """A plain handler in a thread: works until its flag says the caller gave up, or 10 s."""
        mark(tag, "c", "started")
        call = meshkit.current_call()
        assert call is not None
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            if call.cancelled:
                mark(tag, "c", "cancelled")
                return "cancelled"
            time.sleep(0.001)
        mark(tag, "c", "finished")
        return "finished"
