"""A streaming service for the stream tests: ``streamer.count`` yields numbers and says what it did.

Each item made appends ``<tag> made <i> <monotonic time>``, and the
generator's ``finally`` ``<tag> closed -1 <monotonic time>``, to the file
named by ``$STREAM_LOG``; ``time.monotonic`` is the machine's one
``CLOCK_MONOTONIC``, so the test compares these lines with its own readings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import meshkit

from .marks import append_mark


def mark(tag: str, event: str, n: int) -> None:
    append_mark("STREAM_LOG", tag, event, n)


class Streamer(meshkit.Service):
    name = "streamer"

    @meshkit.rpc
    async def count(self, tag: str, n: int, pause: float = 0.0) -> AsyncIterator[int]:
        """Yield ``0 .. n-1``, ``pause`` seconds apart."""
        try:
            for i in range(n):
                if pause:
                    await asyncio.sleep(pause)
                mark(tag, "made", i)
                yield i
        finally:
            mark(tag, "closed", -1)
