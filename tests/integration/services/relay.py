"""``relay``: a service that calls other services from its handlers.

Used to check what crosses a hop by itself: the deadline (``sleep_via_echo``),
the trace context (``nested_trace``) and the caller's metadata.
"""

from __future__ import annotations

import time
from typing import Any

import meshkit


def _span() -> dict[str, Any]:
    ctx = meshkit.current_call()
    assert ctx is not None, "called outside a handler"
    return {
        "trace_id": ctx.trace.trace_id,
        "span_id": ctx.trace.span_id,
        "parent_id": ctx.trace.parent_id,
        "meta": dict(ctx.meta),
        "remaining": ctx.remaining(),
    }


class Relay(meshkit.Service):
    name = "relay"

    def __init__(self, settings: meshkit.Settings | None = None) -> None:
        super().__init__(settings)
        self._outcomes: list[dict[str, Any]] = []

    @meshkit.rpc
    async def sleep_via_echo(self, seconds: float) -> str:
        """Call ``echo.sleep(seconds)`` with no timeout of its own; record how it ended."""
        started = time.monotonic()
        outcome = "ok"
        try:
            return str(await self.service("echo").sleep(seconds))
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self._outcomes.append({"outcome": outcome, "elapsed": time.monotonic() - started})

    @meshkit.rpc(idempotent=True)
    async def outcomes(self) -> list[dict[str, Any]]:
        """How every ``sleep_via_echo`` call's inner call ended, in order."""
        return list(self._outcomes)

    @meshkit.rpc(idempotent=True)
    async def span(self) -> dict[str, Any]:
        """This call's span, metadata and time left."""
        return _span()

    @meshkit.rpc(idempotent=True)
    async def nested_span(self) -> dict[str, Any]:
        """This call's span, and that of a ``relay.span`` call made from it."""
        return {"outer": _span(), "inner": await self.service("relay").span()}

    @meshkit.rpc(idempotent=True)
    def nested_span_plain(self) -> dict[str, Any]:
        """``nested_span`` from a plain handler (thread pool, ``call_blocking``)."""
        return {"outer": _span(), "inner": self.call_blocking("relay", "span")}
