"""Steady load for failure tests: threads calling in a loop, every outcome recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """One call: when it started and ended (``time.monotonic``), and what it gave."""

    label: str
    started: float
    ended: float
    result: Any = None
    error: BaseException | None = None
    worker: str = ""  # the thread that made the call

    @property
    def latency(self) -> float:
        return self.ended - self.started


class Load:
    """Runs each added function in its own thread, over and over, until :meth:`stop`.

    Use as a context manager so the threads are always stopped and joined.
    """

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def add(self, label: str, fn: Callable[[], Any], threads: int = 1) -> None:
        for i in range(threads):
            self._threads.append(threading.Thread(target=self._loop, args=(label, fn),
                                                  name=f"load-{label}-{i}", daemon=True))

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _loop(self, label: str, fn: Callable[[], Any]) -> None:
        worker = threading.current_thread().name
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = fn()
            except Exception as exc:
                outcome = Outcome(label, started, time.monotonic(), error=exc, worker=worker)
            else:
                outcome = Outcome(label, started, time.monotonic(), result=result, worker=worker)
            with self._lock:
                self.outcomes.append(outcome)

    def run_for(self, seconds: float) -> None:
        """Let the load run for a bounded time (this is the load, not a readiness wait)."""
        self._stop.wait(seconds)

    def count(self, label: str | None = None) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if label is None or o.label == label)

    def wait_for_calls(self, n: int, timeout: float = 10.0) -> None:
        """Block until ``n`` more calls have completed (proof the load is flowing)."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"load made fewer than {n} calls in {timeout}s")
            time.sleep(0.01)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load thread did not finish"
        return list(self.outcomes)

    @property
    def workers(self) -> set[str]:
        """The names of the calling threads."""
        return {t.name for t in self._threads}

    def snapshot(self) -> list[Outcome]:
        """The outcomes so far, in the order they ended."""
        with self._lock:
            return list(self.outcomes)

    def failures(self, label: str | None = None) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes
                    if o.error is not None and (label is None or o.label == label)]

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
