"""``meshkit restart WATCHER``: a rolling, graceful restart of a service watcher's processes.

One step, ``batch`` processes at a time, until every process that ran when
the restart began has been replaced:

1. ``incr`` the watcher by ``batch``: Circus starts that many new processes
   (running the code and configuration on disk now);
2. wait until each new process has an ``up`` record in the registry, so it
   takes calls before anything is taken away;
3. ``decr`` the watcher by ``batch``: Circus stops the *oldest* processes
   (``Watcher.manage_processes`` keeps the newest), which are old ones, with
   the watcher's stop signal and graceful timeout, and waits for them. Each
   leaves the registry, drains and exits 0, so callers see no error.

So the watcher never has fewer registered processes than before, and each
replacement is registered before the process it replaces is stopped. The
whole restart holds the control lock, so no other meshkit command changes
the watcher meanwhile.

If a new process exits or does not register within ``register_timeout``, the
restart stops there: every process that is not an old one is stopped (Circus
``kill`` of their pids: the new ones of that step and the copies Circus
started in place of those that crashed) and at once the watcher is set back
to its number of processes; the old processes keep serving.
:class:`RestartFailed` says what happened (with the exit status and the end
of the log of a process that crashed, as the caller's ``explain`` words it)
and which processes run now. (Should Circus's periodic check start yet
another copy between that ``kill`` and the ``decr``, the ``decr`` stops the
oldest process instead, which the error reports.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .control import CircusControl, StackError


class RestartFailed(StackError):
    """A rolling restart stopped before every process was replaced (the old ones that remain still serve).

    ``gone``: the new processes that exited before they registered (``[]``:
    one that exited before it could be listed; None: none exited).
    """

    def __init__(self, message: str, gone: list[int] | None = None) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True, slots=True)
class RestartStep:
    """One step: the processes started, how long until all registered, the processes stopped."""

    started: tuple[int, ...]
    registered_after: float
    stopped: tuple[int, ...]


class RollingRestart:
    """Replaces every process of ``watcher``, ``batch`` at a time (see the module doc).

    ``registered()`` returns the pids that have an ``up`` registry record now.
    ``report(text)`` hears of each step as it happens. ``explain(pids)``
    words why new processes exited before they registered (their exit
    status, the end of their log; ``[]``: a new process nobody saw), added to
    the :class:`RestartFailed` message; empty if it cannot tell.
    """

    def __init__(self, control: CircusControl, watcher: str, registered: Callable[[], set[int]],
                 batch: int = 1, register_timeout: float = 30.0,
                 report: Callable[[str], object] = lambda text: None,
                 explain: Callable[[list[int]], str] = lambda pids: "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if batch < 1:
            raise StackError("batch must be >= 1")
        self.control = control
        self.watcher = watcher
        self.registered = registered
        self.batch = batch
        self.register_timeout = register_timeout
        self.report = report
        self.explain = explain
        self.clock = clock
        self.sleep = sleep

    def run(self, deadline: float) -> list[RestartStep]:
        """Replace every process; return the steps. Raises :class:`RestartFailed` or :class:`StackError`."""
        w = self.watcher
        with self.control.exclusive(deadline):
            if self.control.status().get(w) != "active":
                raise StackError(f"{w} is not running (meshkit start {w} first)")
            remaining = set(self.control.pids(w))
            if not remaining:
                raise StackError(f"{w} has no processes to restart")
            steps: list[RestartStep] = []
            while remaining:
                step = self._step(min(self.batch, len(remaining)), remaining, deadline)
                steps.append(step)
                # An old process that died meanwhile was replaced by Circus: nothing left to do for it.
                remaining = remaining.intersection(self.control.pids(w)) - set(step.stopped)
            return steps

    def _step(self, count: int, old: set[int], deadline: float) -> RestartStep:
        w = self.watcher
        before = set(self.control.pids(w))
        self.control.incr(w, count, deadline)
        started = sorted(set(self.control.pids(w)) - before)
        began = self.clock()
        try:
            if len(started) < count:  # gone before we could even list it
                raise RestartFailed(f"{w}: a new process exited at once (see its log)", [])
            self._wait_registered(started, min(deadline, began + self.register_timeout))
        except RestartFailed as exc:
            why = self.explain(exc.gone) if exc.gone is not None else ""
            undone = self._undo(started, before, deadline)
            raise RestartFailed(f"{exc}; {undone}" + (f"\n{why}" if why else "")) from None
        registered_after = self.clock() - began
        self.control.decr(w, count, deadline)
        stopped = sorted(before - set(self.control.pids(w)))
        unexpected = [pid for pid in stopped if pid not in old]
        if unexpected:  # only if someone else changed the watcher despite the lock
            raise StackError(f"{w}: Circus stopped {unexpected}, which were not old processes")
        self.report(f"{w}: started {_pids(started)} (registered after {registered_after:.1f}s), "
                    f"stopped {_pids(stopped)}")
        return RestartStep(tuple(started), registered_after, tuple(stopped))

    def _wait_registered(self, pids: list[int], until: float) -> None:
        w = self.watcher
        while True:
            running = set(self.control.pids(w))
            gone = [pid for pid in pids if pid not in running]
            if gone:
                raise RestartFailed(f"{w}: new process {_pids(gone)} exited before it registered "
                                    f"(see its log)", gone)
            if set(pids) <= self.registered():
                return
            if self.clock() > until:
                missing = sorted(set(pids) - self.registered())
                raise RestartFailed(f"{w}: new process {_pids(missing)} did not register within "
                                    f"{self.register_timeout:.0f}s (see its log)")
            self.sleep(0.1)

    def _undo(self, started: list[int], before: set[int], deadline: float) -> str:
        """Stop the new processes of a failed step and restore the number of processes; say what runs now."""
        w = self.watcher
        try:
            # Every process that is not an old one: a new process that crashed has
            # already been replaced by Circus (it reaps and respawns in one
            # check), and a live replacement would outlive the decr, which keeps
            # the newest processes and so would stop an old one instead.
            for pid in sorted(set(self.control.pids(w)) - before):
                self.control.call("kill", deadline, name=w, pid=pid, waiting=True)
            # Right away: a killed process stays listed, dead, until Circus's next
            # check, which then drops it, and after the decr starts none in its place.
            self.control.decr(w, len(started), deadline)
        except StackError as exc:
            return f"undoing the step failed too ({exc}); check `meshkit status`"
        now = set(self.control.pids(w))
        lost = sorted(before - now)
        note = f"; the old process {_pids(lost)} was stopped as well" if lost else ""
        return f"restart abandoned, {w} runs {_pids(sorted(now))}{note}"


def _pids(pids: list[int]) -> str:
    return ", ".join(f"pid {pid}" for pid in pids) if pids else "nothing"
