"""The blocking Client's hand-over of calls to its loop: a burst of calls shares one loop wake-up.

No network: the client's :class:`~meshkit.AsyncClient` is replaced by a stub,
and the calls are plain coroutines run through ``Client._run``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import meshkit
from meshkit.errors import ClientClosedError

_WAIT = 5.0


class _StubAsync:
    async def close(self) -> None:
        pass


class CountingClient(meshkit.Client):
    """A Client whose AsyncClient is a stub, counting the loop's hand-over passes."""

    def __init__(self) -> None:
        self.passes = 0
        super().__init__(meshkit.Settings())

    async def _make(self) -> Any:
        return _StubAsync()

    def _start_handed(self) -> None:
        self.passes += 1
        super()._start_handed()


async def _value(n: int) -> int:
    await asyncio.sleep(0)  # a real suspension, as a call's has
    return n * 2


async def _fail() -> None:
    raise KeyError("x")


def _wait_for(check: Any, what: str) -> None:
    end = time.monotonic() + _WAIT
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {_WAIT}s")
        time.sleep(0.001)


def test_calls_handed_over_while_the_loop_is_busy_share_one_wake_up() -> None:
    client = CountingClient()
    try:
        passes_before = client.passes
        release = threading.Event()
        client._loop.call_soon_threadsafe(release.wait, _WAIT)  # the loop is busy until released
        results: dict[int, int] = {}

        def caller(n: int) -> None:
            results[n] = client._run(_value(n))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(client._handed) == 16, "16 calls queueing")
        release.set()
        for thread in threads:
            thread.join(_WAIT)
        assert results == {n: n * 2 for n in range(16)}
        assert client.passes - passes_before == 1  # one wake-up for the 16
        assert not client._handed and not client._tasks
        # Later calls each wake the (idle) loop again, and errors reach their caller.
        assert client._run(_value(4)) == 8
        with pytest.raises(KeyError):
            client._run(_fail())
        assert client.passes - passes_before == 3
    finally:
        client.close()
    with pytest.raises(ClientClosedError):
        client._run(_value(1))


def test_many_threads_sharing_a_client_each_get_their_own_answers() -> None:
    client = CountingClient()
    try:
        errors: list[BaseException] = []

        def caller(base: int) -> None:
            try:
                for i in range(200):
                    assert client._run(_value(base + i)) == (base + i) * 2
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k * 1000,)) for k in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors and not any(t.is_alive() for t in threads)
        assert not client._handed
    finally:
        client.close()
