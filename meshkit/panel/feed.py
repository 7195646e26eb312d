"""One browser's outgoing messages: a queue bounded in bytes that drops, counts and says so.

A browser tab that reads slowly (a laptop asleep, a tunnel with a small
window) must never make the panel's memory grow. :class:`SendQueue` holds
the text frames waiting for one WebSocket, at most ``max_bytes`` of them
(UTF-8 length). :meth:`SendQueue.put` never blocks and never raises: a
frame that does not fit is dropped and counted, and the next frame the
sender takes (:meth:`SendQueue.get`) is a ``{"type": "dropped", "count": N}``
notice, so the page can tell its user that it missed some. A frame larger
than the whole bound is dropped the same way. A frame put with a ``kind``
(the periodic state) replaces the one of that kind still waiting, so a slow
tab catches up on the latest state instead of a backlog.

Pure: no I/O; the WebSocket sender in :mod:`.app` awaits :meth:`get`.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

DEFAULT_MAX_BYTES = 1024 * 1024  # one tab: a few hundred state frames or ~2,000 tap events


class SendQueue:
    """Text frames for one WebSocket, at most ``max_bytes`` waiting."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._frames: deque[tuple[str, int, str | None]] = deque()
        self._bytes = 0
        self.dropped = 0  # frames dropped and not yet reported to the browser
        self.dropped_total = 0
        self._ready = asyncio.Event()
        self.closed = False

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: str, kind: str | None = None) -> bool:
        """Queue ``frame``; False if it was dropped (the queue is full, or closed).

        A frame with a ``kind`` replaces the one of the same kind still
        waiting, if any: a slow tab gets the latest state, not a backlog of
        stale ones.
        """
        size = len(frame.encode())
        if kind is not None and not self.closed:
            for i, (_, old_size, old_kind) in enumerate(self._frames):
                if old_kind == kind:
                    del self._frames[i]
                    self._bytes -= old_size
                    break
        if self.closed or self._bytes + size > self.max_bytes:
            self.dropped += 1
            self.dropped_total += 1
            self._ready.set()  # the notice itself is worth waking the sender for
            return False
        self._frames.append((frame, size, kind))
        self._bytes += size
        self._ready.set()
        return True

    def take(self) -> str | None:
        """The next frame without waiting (a drop notice first), or None if there is none."""
        if self.dropped:
            notice = json.dumps({"type": "dropped", "count": self.dropped})
            self.dropped = 0
            return notice
        if not self._frames:
            return None
        frame, size, _ = self._frames.popleft()
        self._bytes -= size
        return frame

    async def get(self) -> str | None:
        """Wait for the next frame; None once the queue is closed and empty."""
        while True:
            frame = self.take()
            if frame is not None:
                return frame
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """Refuse further frames and wake the sender (what is queued is dropped)."""
        self.closed = True
        self._frames.clear()
        self._bytes = 0
        self.dropped = 0
        self._ready.set()
