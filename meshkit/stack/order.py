"""The order in which a stack stops: the public side first, Redis last.

Circus's own ``quit`` stops every watcher at once. Redis then goes while the
services still need it to leave the registry and to delete connection state,
so every shutdown logged bursts of warnings. :data:`STOP_ORDER` is the one
table that says who stops when; :func:`stop_plan` turns it and the running
watchers into stages (a pure function, tested without Circus), and
:func:`stop_in_order` applies the plan through :class:`CircusControl` and
then quits circusd, which has nothing left to stop.

Stages, first to last:

1. ``flapguard``: nothing must be restarted or stopped behind our back.
2. ``gateway``: the public side. Each leaves the registry (so HAProxy sends
   it no new clients), tells its clients ``shutting_down``, closes them at the
   end of its drain grace and deletes their connection state.
3. ``haproxy``: the sync process, then HAProxy itself, which is no watcher
   (it outlives its sync process, see docs/haproxy.md) and is stopped by
   :func:`meshkit.haproxy.process.stop_haproxy` right after. Its soft stop
   waits for its open connections to end, and the gateways have just ended
   them, so it stops at once (stopped first, it waited for its clients until
   its stop timeout, then stopped hard).
4. every other watcher (backends, publishers, your own services), one at a
   time, lowest Circus ``priority`` first (the reverse of start order), by
   name when priorities tie.
5. ``redis``: last, once everyone has left the registry through it.

To place one more watcher, add its name to :data:`STOP_ORDER` before or after
the :data:`SERVICES` entry. Circus's own helpers (``circusd-stats``,
``plugin:*``) are left to ``quit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .control import CircusControl

SERVICES = "*"  # the stage of every watcher STOP_ORDER does not name
STOP_ORDER: tuple[str, ...] = ("flapguard", "gateway", "haproxy", SERVICES, "redis")


def _circus_own(name: str) -> bool:
    return name == "circusd-stats" or name.startswith("plugin:")


def stop_plan(statuses: Mapping[str, str], priorities: Mapping[str, int],
              order: tuple[str, ...] = STOP_ORDER) -> list[str]:
    """Watchers to stop, in order: those of ``statuses`` not already ``stopped``, staged by ``order``.

    ``priorities`` gives each watcher's Circus priority (missing: 0); within
    the :data:`SERVICES` stage lower priorities stop first.
    """
    running = [w for w, state in statuses.items() if state != "stopped" and not _circus_own(w)]
    named = [w for w in order if w != SERVICES]
    plan: list[str] = []
    for entry in order:
        if entry == SERVICES:
            rest = [w for w in running if w not in named]
            plan.extend(sorted(rest, key=lambda w: (priorities.get(w, 0), w)))
        elif entry in running:
            plan.append(entry)
    return plan


def stop_in_order(control: CircusControl, deadline: float,
                  on_stop: Callable[[str], None] = lambda watcher: None,
                  after_stop: Callable[[str], None] = lambda watcher: None,
                  clock: Callable[[], float] = time.monotonic) -> None:
    """Stop every watcher in :func:`stop_plan` order, then ``quit`` circusd; all by ``deadline``.

    Each stop waits for the watcher's graceful stop. ``on_stop(watcher)`` is
    called before each, ``after_stop(watcher)`` once it has stopped. Raises
    :class:`StackError` if a command fails or the deadline passes; the caller
    then stops what is left by force.
    """
    with control.exclusive(deadline):
        statuses = control.status()
        priorities = {w: control.priority(w) for w in statuses if not _circus_own(w)}
        for watcher in stop_plan(statuses, priorities):
            on_stop(watcher)
            control.stop(watcher, deadline=deadline)
            after_stop(watcher)
        control.quit(deadline=deadline)
