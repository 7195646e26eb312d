"""Streamed calls: an ``@rpc`` async generator's items, sent under credit (``docs/protocol.md`` §4, "Streams").

A streamed call is a CALL whose ``meta`` carries :data:`STREAM_META` (the
caller's window, a decimal count of items), sent only to an instance whose
record lists the ``"stream"`` feature. The instance answers it with ITEMs,
one per item the generator yields, then REPLY nil when the generator ends
(or ERROR if it raised, or its deadline passed). It sends at most as many
ITEMs as the caller has granted: the window, then what each CREDIT adds.

Both ends hold a bounded amount:

* the instance (:class:`ServerStreams`) pulls the next item from the
  generator only once it holds a credit for it, so a consumer that stops
  reading stops the producer after at most ``window`` items, and the
  instance holds one item at a time;
* the caller (:class:`Stream`, accounting in :class:`Window`) buffers at most
  ``window`` items, each at most ``max_message_size`` bytes, and grants
  credit back as its consumer takes items, in batches of half the window.
  An instance that sends more than it was granted breaks the protocol: the
  stream fails with ``bad_request`` and is cancelled.

A caller that stops iterating (``break``, the iterator dropped or closed,
its task cancelled) sends CANCEL: the instance cancels the serving task,
which closes the generator (its ``finally`` runs). The call's deadline
bounds the whole stream: at its end the caller raises
:class:`~meshkit.errors.CallTimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from . import wire
from .clock import SYSTEM_CLOCK, Clock
from .codes import ErrorCode
from .errors import CallTimeoutError, LostPeerError, NoInstanceError, ProtocolError, error_from_wire
from .exchange import DeadlinePassed, LostInFlight, NotDelivered
from .handlers import Handler
from .invoke import BadArguments
from .limits import CallLimits
from .signature import ArgumentTypeError
from .timing import run_with_deadline
from .untrusted import clip

if TYPE_CHECKING:
    from .peer import Peer
    from .pool import PeerPool

__all__ = ["DEFAULT_WINDOW", "MAX_WINDOW", "STREAM_META", "ServerStreams", "Stream", "Window"]

STREAM_META = "mk-stream"  # the meta key that makes a CALL a streamed one; its value is the window
DEFAULT_WINDOW = 16
# What one caller may grant an instance at most (window included): credit is only a count,
# but an unbounded one would let a peer make the producer run unchecked.
MAX_WINDOW = 1024

Send = Callable[[bytes, list[bytes]], None]


def encode_item(id: int, item: Any) -> list[bytes]:
    """Frames of an ITEM of the streamed call ``id`` (``TypeError`` if ``item`` is not MessagePack-able)."""
    return [wire.pack([wire.VERSION, wire.ITEM, id]), wire.pack(item)]


def encode_credit(id: int, count: int) -> list[bytes]:
    """Frames of a CREDIT: the caller of ``id`` can take ``count`` more ITEMs."""
    return [wire.pack([wire.VERSION, wire.CREDIT, id]), wire.pack(count)]


def decode_credit(frame: bytes) -> int:
    """A CREDIT body: an integer from 1 to :data:`MAX_WINDOW`, else ``bad_request``."""
    if len(frame) > 9:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "CREDIT body must be a small integer")
    count = wire.unpack(frame)
    if type(count) is not int or not 1 <= count <= MAX_WINDOW:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"CREDIT must be 1..{MAX_WINDOW}, got {clip(count)}")
    return count


def parse_window(text: str) -> int:
    """The window a streamed CALL's :data:`STREAM_META` names, 1..:data:`MAX_WINDOW`, else ``ValueError``."""
    if not (text.isdigit() and len(text) <= 4) or not 1 <= int(text) <= MAX_WINDOW:
        raise ValueError(f"{STREAM_META} must be a window of 1..{MAX_WINDOW} items, got {clip(text)!r}")
    return int(text)


class Credit:
    """The instance's side of one stream: how many more ITEMs it may send (never above :data:`MAX_WINDOW`)."""

    def __init__(self, window: int) -> None:
        self.available = window
        self._granted = asyncio.Event()
        if window > 0:
            self._granted.set()

    def grant(self, count: int) -> None:
        """The caller can take ``count`` more."""
        self.available = min(self.available + count, MAX_WINDOW)
        self._granted.set()

    async def take(self) -> None:
        """Wait until one ITEM may be sent, and count it sent."""
        while self.available <= 0:
            self._granted.clear()
            await self._granted.wait()
        self.available -= 1


class ServerStreams:
    """The streams one server is sending: their credit, keyed by (sender, id)."""

    def __init__(self, send: Send, max_item: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._send = send
        self._max_item = max_item
        self._clock = clock
        self._credits: dict[tuple[bytes, int], Credit] = {}
        self.items_sent = 0

    def admit(self, handler: Handler, header: wire.Header) -> tuple[str | None, int]:
        """``(why not, window)`` for the CALL ``header`` to ``handler``: why it cannot be served, or None.

        The window is 0 for a call that does not stream. The stream mark is
        taken off ``header.meta``: it is not passed on to nested calls.
        """
        meta = header.meta
        window = meta.pop(STREAM_META, None) if meta else None
        if window is None:
            if handler.is_stream:
                return f"{clip(header.name)} streams its answer: call it with stream()", 0
            return None, 0
        header.meta = meta or None
        if not handler.is_stream:
            return f"{clip(header.name)} does not stream: call it with call()", 0
        try:
            return None, parse_window(window)
        except ValueError as exc:
            return str(exc), 0

    def credit(self, identity: bytes, request_id: int, frame: bytes) -> bool:
        """Apply a CREDIT; False if it matched no stream or could not be read (it is never answered)."""
        credit = self._credits.get((identity, request_id))
        if credit is None:
            return False
        try:
            credit.grant(decode_credit(frame))
        except ProtocolError:
            return False
        return True

    async def run(self, identity: bytes, header: wire.Header, handler: Handler, window: int,
                  args: list[Any], kwargs: dict[str, Any], deadline: float | None,
                  limits: CallLimits | None = None, cost: int = 0) -> None:
        """Serve a streamed call: send the generator's items under credit, until it ends (then REPLY nil).

        Raises what the handler raised, :class:`BadArguments`, or
        :class:`~meshkit.timing.DeadlineCancel` at the deadline; the
        generator is closed however it ends.
        """
        types = handler.types
        if types is not None and types.checks:
            try:
                args, kwargs = types.apply(args, kwargs)
            except ArgumentTypeError as exc:
                raise BadArguments(clip(str(exc), 500)) from None
        problem = handler.check_arguments(args, kwargs)
        if problem is not None:
            raise BadArguments(clip(problem, 500))
        key = (identity, header.id)
        credit = self._credits[key] = Credit(window)
        if limits is not None:
            await limits.enter(handler, cost, deadline)
        try:
            drive = self._drive(handler.fn(*args, **kwargs), credit, identity, header.id)
            if deadline is None:
                await drive
            else:
                await run_with_deadline(drive, deadline, self._clock)
        finally:
            self._credits.pop(key, None)
            if limits is not None:
                limits.leave(handler)

    async def _drive(self, items: AsyncIterator[Any], credit: Credit, identity: bytes, request_id: int) -> None:
        try:
            while True:
                await credit.take()  # before the next item is made: a slow consumer stops the producer
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    return
                frames = encode_item(request_id, item)
                if len(frames[1]) > self._max_item:
                    raise ValueError(f"stream item of {len(frames[1])} bytes exceeds max_message_size "
                                     f"{self._max_item}")
                self._send(identity, frames)
                self.items_sent += 1
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()  # its finally runs now, whether it ended, failed or was cancelled


class Window:
    """The caller's credit arithmetic for one stream of window ``size``.

    ``outstanding`` is what the instance may still send; items received and
    not yet consumed plus ``outstanding`` never exceed ``size``. Consumed
    items are granted back in batches of half the window (at least one).
    """

    def __init__(self, size: int) -> None:
        if not 1 <= size <= MAX_WINDOW:
            raise ValueError(f"stream window must be 1..{MAX_WINDOW}, got {size}")
        self.size = size
        self.outstanding = size
        self._consumed = 0
        self._batch = max(1, size // 2)

    def received(self) -> bool:
        """One ITEM arrived; False if it was not granted (the instance broke the protocol)."""
        if self.outstanding <= 0:
            return False
        self.outstanding -= 1
        return True

    def consumed(self) -> int:
        """One item was handed to the consumer; return the credit to grant now (0: none yet)."""
        self._consumed += 1
        if self._consumed < self._batch:
            return 0
        grant, self._consumed = self._consumed, 0
        self.outstanding += grant
        return grant


class _Buffer:
    """What has arrived of one stream and is not yet consumed; the exchange holds this, never the :class:`Stream`.

    (So dropping the :class:`Stream` frees it, and its ``__del__`` tells the instance.)
    """

    __slots__ = ("failure", "items", "ready", "window")

    def __init__(self, window: int) -> None:
        self.window = Window(window)
        self.items: collections.deque[Any] = collections.deque()
        self.ready = asyncio.Event()
        self.failure: str | None = None

    def put(self, value: Any) -> None:
        if self.failure is not None:
            return
        if not self.window.received():
            self.failure = "the instance sent ITEMs beyond its credit"
            self.items.clear()
        else:
            self.items.append(value)
        self.ready.set()

    def ended(self, future: asyncio.Future[wire.Answer]) -> None:
        if not future.cancelled():
            future.exception()  # read here: a stream dropped unfinished leaves nobody else to
        self.ready.set()


class Stream:
    """The caller's end of one streamed call: an async iterator of its items (see the module doc).

    Made by :meth:`meshkit.AsyncClient.stream`; the CALL is sent on the
    first ``__anext__``. Stopping early (``break``, :meth:`aclose`, the
    iterator dropped) cancels the call on the instance.
    """

    def __init__(self, pool: PeerPool, message: wire.CallMessage, deadline: float, window: int) -> None:
        self._pool = pool
        self._message = message
        self._deadline = deadline
        self._buffer = _Buffer(window)
        self._peer: Peer | None = None
        self._id = 0
        self._future: asyncio.Future[wire.Answer] | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._future is None:
            self._open()
        future, buffer = self._future, self._buffer
        assert future is not None
        while not buffer.items:
            if buffer.failure is not None:
                self._withdraw()
                raise error_from_wire(ErrorCode.BAD_REQUEST, buffer.failure,
                                      service=self._message.service, method=self._message.method)
            if future.done():
                self._finish(future)
                raise StopAsyncIteration
            buffer.ready.clear()
            try:
                await buffer.ready.wait()
            except asyncio.CancelledError:
                self._withdraw()
                raise
        item = buffer.items.popleft()
        grant = buffer.window.consumed()
        if grant and self._peer is not None and not future.done():
            self._peer.send(encode_credit(self._id, grant))
        return item

    async def aclose(self) -> None:
        """Stop the stream: the instance is told (CANCEL) if it is still sending."""
        self._withdraw()

    def __del__(self) -> None:
        try:
            self._withdraw()  # ``async for ... break`` drops the iterator: this is when the instance is told
        except Exception:  # at interpreter exit, or after its loop closed: nothing to tell
            pass

    def _open(self) -> None:
        pool, message = self._pool, self._message
        peer = pool.pick(message.service, set())
        if peer is None:
            raise NoInstanceError(f"no live instance of service {message.service!r}",
                                  service=message.service, method=message.method)
        if wire.FEATURE_STREAM not in peer.record.features:
            raise NoInstanceError(f"instance {peer.key} of {message.service!r} does not stream",
                                  service=message.service, method=message.method)
        try:
            self._id, self._future = pool.exchange.start_stream(peer, message, self._deadline, self._buffer.put)
        except DeadlinePassed:
            raise CallTimeoutError(f"{message.service}.{message.method} deadline passed before it was sent",
                                   service=message.service, method=message.method) from None
        except NotDelivered as exc:
            raise NoInstanceError(str(exc), service=message.service, method=message.method) from None
        self._peer = peer
        self._future.add_done_callback(self._buffer.ended)

    def _withdraw(self) -> None:
        future, peer = self._future, self._peer
        if future is not None and peer is not None and not future.done():
            self._pool.exchange.withdraw(peer, future)
            if not future.done():
                future.cancel()
    def _finish(self, future: asyncio.Future[wire.Answer]) -> None:
        """The stream ended: return if it ended well, else raise what it came to."""
        service, method = self._message.service, self._message.method
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, DeadlinePassed):
            raise CallTimeoutError(f"{service}.{method} did not finish its stream within its deadline",
                                   service=service, method=method)
        if isinstance(exc, LostInFlight):
            raise LostPeerError(f"instance was lost with the stream {service}.{method} open",
                                service=service, method=method)
        if isinstance(exc, NotDelivered):
            raise NoInstanceError(f"{service}.{method}: {exc}", service=service, method=method)
        if exc is not None:
            raise exc
        answer = future.result()
        if answer.error is not None:
            err = answer.error
            raise error_from_wire(err.code, err.message, service=service, method=method,
                                  remote_type=err.type, remote_traceback=err.traceback)
