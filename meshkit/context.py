"""The context of the call or push being served, carried in a contextvar.

While a handler runs, :func:`current_call` returns its :class:`CallContext`:
the deadline, the span, and the caller's metadata (for example the gateway's
connection id and client address). Calls and publishes made from inside a handler read it to
carry the deadline, the trace and the metadata to the next hop, so user code
never passes them by hand. Plain handlers running in the thread pool see the
same context (it is copied into the worker thread).

Cancellation: when the caller stops waiting, its CANCEL cancels an async
handler's task (the handler sees :class:`asyncio.CancelledError`, and the
calls it is awaiting are cancelled in turn, hop by hop). A plain handler in
a thread cannot be interrupted: it should check ``current_call().cancelled``
between steps of long work and return early once it is true (whatever it
returns then is not sent: nobody is waiting for it).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .trace import TraceContext

_EMPTY: Mapping[str, str] = {}


class CancelFlag:
    """Set once, when the caller of the call being served gave up (read from any thread)."""

    __slots__ = ("is_set", "reason")

    def __init__(self) -> None:
        self.is_set = False  # a bool store is atomic: no lock needed to set or read it
        self.reason = ""  # why, once set: the CANCEL's reason (``wire.CANCELLED``, ``DEADLINE``, ``CLOSED``)


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about the message it is serving.

    ``deadline`` is a :func:`time.monotonic` instant or ``None`` for none;
    ``meta`` is the caller's string metadata, passed on to nested calls.
    """

    service: str
    name: str
    trace: TraceContext
    deadline: float | None = None
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    flag: CancelFlag = field(default_factory=CancelFlag)
    push_seq: int | None = None  # a push: its number in its publisher's stream (None: not numbered)
    gap: int = 0  # a push: how many pushes of its stream this subscriber missed just before it

    @property
    def cancelled(self) -> bool:
        """Whether the caller cancelled this call (CANCEL received): stop working, the answer is dropped."""
        return self.flag.is_set

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (never negative), or ``None``."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() if now is None else now))

    @property
    def connection_id(self) -> str | None:
        """The gateway connection this call came from, if any."""
        return self.meta.get("conn")

    @property
    def client_address(self) -> str | None:
        """The address (``ip:port``) of the gateway client this call came from, if any.

        Behind HAProxy it is the client's own address, from the PROXY header.
        """
        return self.meta.get("client")


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "meshkit_call", default=None
)


def current_call() -> CallContext | None:
    """The context of the call being served by this task or thread, if any."""
    return _current.get()


def set_current(ctx: CallContext | None) -> contextvars.Token[CallContext | None]:
    """Make ``ctx`` current; return the token that :func:`reset_current` takes."""
    return _current.set(ctx)


def reset_current(token: contextvars.Token[CallContext | None]) -> None:
    """Restore the context that was current before :func:`set_current`."""
    _current.reset(token)
