"""``meshkit.Client``: the mesh for blocking code (scripts, web apps, the CLI).

It runs an :class:`AsyncClient` on an event loop (meshkit's, see
:mod:`meshkit.loops`) in a background thread and blocks the calling thread
on each call, so the caller writes no asyncio. It is safe to share between
threads. Results and errors are exactly those of :class:`AsyncClient`.

A call is handed to the loop through a queue and waited for on a plain
lock that the call's task releases as it finishes: no
``concurrent.futures.Future`` and no done-callback hop, which is most of
what ``asyncio.run_coroutine_threadsafe`` costs per call (measured in
``docs/performance.md``). Calls handed over while the loop has not yet
taken the last ones share one ``call_soon_threadsafe`` (one write to the
loop's wake-up pipe, one wake-up): with many threads sharing a client, a
burst of calls costs one loop wake-up, not one each.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from . import loops
from .client import AsyncClient, ServiceProxy
from .config import Settings
from .errors import ClientClosedError
from .record import InstanceRecord
from .streams import DEFAULT_WINDOW, Stream

T = TypeVar("T")


class _Waiter:
    """One blocked caller: the outcome of its coroutine, and a lock released when it is there."""

    __slots__ = ("error", "lock", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.value: Any = None
        self.error: BaseException | None = None


async def _drive(coro: Coroutine[Any, Any, Any], waiter: _Waiter, tasks: set[asyncio.Task[None]]) -> None:
    try:
        waiter.value = await coro
    except BaseException as exc:  # handed to the caller's thread, which raises it
        waiter.error = exc
    finally:
        waiter.lock.release()
        tasks.discard(asyncio.current_task())


class Client:
    """A blocking mesh client. ``Client(settings)`` or ``Client(redis_url=..., namespace=...)``."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings.replace(**overrides) if settings else Settings.load(**overrides)
        self._loop = loops.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshkit-client", daemon=True)
        self._thread.start()
        self._async: AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Calls handed over, not yet started by the loop; _wake_pending: a _start_handed is scheduled.
        # Both are read and written under the GIL only (deque.append and popleft are atomic).
        self._handed: deque[tuple[Coroutine[Any, Any, Any], _Waiter]] = deque()
        self._wake_pending = False
        self._closed = False
        try:
            self._async = self._run(self._make())
        except BaseException:
            self._stop_loop()
            raise

    async def _make(self) -> AsyncClient:
        client = AsyncClient(self.settings)
        await client.start()
        return client

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise ClientClosedError("client is closed")
        waiter = _Waiter()
        self._handed.append((coro, waiter))
        # Appended before the flag is read; the loop clears the flag before it drains the
        # queue: so either the pending wake-up sees this call, or this thread schedules one.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._start_handed)
            except RuntimeError:  # the loop is closed: nothing will take the queue
                self._wake_pending = False
                raise
        if not waiter.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"the client's loop did not finish within {timeout} s")
        if waiter.error is not None:
            raise waiter.error
        return waiter.value  # type: ignore[no-any-return]

    def _start_handed(self) -> None:
        # In the loop's thread. The set holds each task until it ends (the loop keeps only weak references).
        self._wake_pending = False
        handed, tasks, create_task = self._handed, self._tasks, self._loop.create_task
        while handed:
            coro, waiter = handed.popleft()
            tasks.add(create_task(_drive(coro, waiter, tasks)))

    @property
    def _client(self) -> AsyncClient:
        if self._async is None:
            raise ClientClosedError("client is closed")
        return self._async

    def call(self, service: str, method: str, args: Sequence[Any] = (),
             kwargs: Mapping[str, Any] | None = None, *, timeout: float | None = None,
             wait: bool = False, meta: Mapping[str, str] | None = None,
             traceparent: str | None = None) -> Any:
        """Call ``service.method(*args, **kwargs)``; see :meth:`AsyncClient.call`."""
        return self._run(self._client.call(service, method, args, kwargs, timeout=timeout,
                                           wait=wait, meta=meta, traceparent=traceparent))

    def call_instance(self, instance_id: str, method: str, *args: Any, timeout: float | None = None,
                      **kwargs: Any) -> Any:
        """Call ``method`` on exactly the instance ``instance_id``; see :meth:`AsyncClient.call_instance`."""
        return self._run(self._client.call_instance(instance_id, method, *args, timeout=timeout, **kwargs))

    def stream(self, service: str, method: str, *args: Any, timeout: float | None = None,
               window: int = DEFAULT_WINDOW, **kwargs: Any) -> Iterator[Any]:
        """``for item in client.stream(service, method, *args)``; see :meth:`AsyncClient.stream`."""
        client = self._client

        async def make() -> Stream:
            return client.stream(service, method, *args, timeout=timeout, window=window, **kwargs)

        return _BlockingStream(self, self._run(make()))

    def publish(self, topic: str, payload: Any, *, timeout: float | None = None) -> int:
        """Push to every subscriber of ``topic``; see :meth:`AsyncClient.publish`."""
        return self._run(self._client.publish(topic, payload, timeout=timeout))

    def service(self, name: str, *, timeout: float | None = None, wait: bool = False) -> ServiceProxy:
        """A proxy: ``client.service("echo").echo(42)`` blocks and returns the result."""
        return ServiceProxy(self.call, name, timeout, wait, self.stream)

    @property
    def in_flight(self) -> int:
        """Requests of this client waiting for their answers now (a snapshot, readable from any thread)."""
        return self._client.exchange.in_flight

    def instances(self, service: str | None = None) -> list[InstanceRecord]:
        """The cached registry view (no Redis round trip)."""
        return list(self._client.registry.instances(service))

    def close(self) -> None:
        """Close connections and stop the background loop. Idempotent."""
        if self._closed:
            return
        if self._async is not None:
            self._run(self._async.close(), timeout=10)
            self._async = None
        self._closed = True
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BlockingStream:
    """A :class:`~meshkit.streams.Stream` iterated from a blocking thread; dropping or closing it cancels it."""

    def __init__(self, owner: Client, stream: Stream) -> None:
        self._owner = owner
        self._stream: Stream | None = stream

    def __iter__(self) -> _BlockingStream:
        return self

    def __next__(self) -> Any:
        if self._stream is None:
            raise StopIteration
        try:
            return self._owner._run(self._stream.__anext__())
        except StopAsyncIteration:
            self._stream = None
            raise StopIteration from None

    def close(self) -> None:
        """Stop the stream (the instance is told); idempotent."""
        stream, self._stream = self._stream, None
        if stream is not None and not self._owner._closed:
            # Its socket belongs to the loop's thread: the withdrawal runs there (the callback holds it).
            self._owner._loop.call_soon_threadsafe(stream._withdraw)

    def __enter__(self) -> _BlockingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except RuntimeError:  # the loop is already closed: nothing is left to tell
            pass
