"""Sequence numbers of push streams: a subscriber can tell that it missed a publish.

A *stream* is what one publisher sends to one subscriber instance over one
connection object (one :class:`~meshkit.peer.Peer`). The publisher numbers
each stream's pushes 1, 2, 3 ... and sends the number in the PUSH's meta under
:data:`SEQ_KEY` as ``"<stream>:<n>"``, ``<stream>`` being 16 hex digits drawn
at random when the stream starts (``docs/protocol.md`` §9). A number is used
up whenever a push is meant for the subscriber, also when it could not be
sent (the subscriber did miss it).

The subscriber (:class:`PushSequences`) keeps the last number of each stream
and reports, per push, how many numbers were skipped since: the *gap*
(counted in the ``push.missed`` metric, and ``current_call().gap`` for the
handler, with ``current_call().push_seq``). The first push of a stream seen
has a gap of ``n - 1``. The key is taken out of the meta a handler sees, so
it never travels on to the handler's own calls.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Mapping
from typing import Any

from . import wire

__all__ = ["SEQ_KEY", "PushSequences", "PushStreams", "SequencedPush"]

SEQ_KEY = "_seq"  # underscored: not a name callers pick for their own metadata
# Streams a subscriber remembers; past this the one heard from longest ago is forgotten.
MAX_STREAMS = 4096
_NO_META: Mapping[str, str] = {}


class SequencedPush:
    """A PUSH with its stream's number, as :class:`~meshkit.exchange.Exchange` sends it."""

    __slots__ = ("message", "stamp")

    def __init__(self, message: wire.PushMessage, stamp: str) -> None:
        self.message = message
        self.stamp = stamp

    def frames(self, id: int, timeout_ms: int | None) -> list[bytes]:
        m = self.message
        meta = dict(m.meta) if m.meta else {}
        meta[SEQ_KEY] = self.stamp
        return [wire.pack([wire.VERSION, wire.PUSH, id, "", m.topic, timeout_ms, m.traceparent, meta]), m.body]


class _Stream:
    __slots__ = ("next", "token")

    def __init__(self, token: str) -> None:
        self.token = token
        self.next = 1


class PushStreams:
    """The publisher's side: one numbered stream per peer (forgotten with the peer)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.SystemRandom()
        self._streams: weakref.WeakKeyDictionary[Any, _Stream] = weakref.WeakKeyDictionary()

    def stamp(self, peer: object, message: wire.PushMessage) -> SequencedPush:
        """``message`` with the next number of ``peer``'s stream (used up now, sent or not)."""
        stream = self._streams.get(peer)
        if stream is None:
            stream = self._streams[peer] = _Stream(f"{self._rng.getrandbits(64):016x}")
        n = stream.next
        stream.next = n + 1
        return SequencedPush(message, f"{stream.token}:{n}")


class PushSequences:
    """The subscriber's side: the last number of each stream heard from (bounded)."""

    def __init__(self, max_streams: int = MAX_STREAMS) -> None:
        self._last: dict[str, int] = {}
        self._max = max_streams
        self.missed = 0  # pushes skipped over, every stream together

    def observe(self, meta: Mapping[str, str] | None) -> tuple[Mapping[str, str], int | None, int]:
        """``(meta without the key, number or None, gap)`` of one push, in arrival order of its stream.

        A push without a (well-formed) number is not part of any stream: ``None``, gap 0.
        """
        if not meta or SEQ_KEY not in meta:
            return meta or _NO_META, None, 0
        rest = {k: v for k, v in meta.items() if k != SEQ_KEY}
        token, _, number = meta[SEQ_KEY].partition(":")
        if len(token) != 16 or not (number.isascii() and number.isdigit()) or len(number) > 19:
            return rest, None, 0
        n = int(number)
        last = self._last.pop(token, 0)  # popped and put back: the dict stays in order of use
        gap = max(0, n - last - 1)
        self._last[token] = max(n, last)
        if len(self._last) > self._max:
            del self._last[next(iter(self._last))]
        self.missed += gap
        return rest, n, gap
