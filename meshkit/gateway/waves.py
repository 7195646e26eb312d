"""When a stopping gateway asks its clients to reconnect elsewhere: waves over a window (pure).

btcpool saw its hashrate take 30 minutes to recover after a redeploy in
which every miner reconnected at once; spreading the moves is the cure.
:func:`plan` returns the waves as ``(offset, count)`` pairs: ``count``
clients are told at ``offset`` seconds after the stop began. Without a
rate the clients are spread evenly over ``window`` (a wave every
:data:`STEP` seconds, the first at 0). With ``rate`` (clients per second,
per gateway) the even plan is kept if no second of it holds more than
``rate``; otherwise clients are told as fast as ``rate`` allows (waves of
``floor(rate * STEP)`` every :data:`STEP` seconds, or one client every
``1 / floor(rate)`` seconds for a lower rate), which may last longer than
``window``: the gateway closes whoever is left when its ``drain_grace`` ends.
"""

from __future__ import annotations

import math

#: Seconds between waves when the clients are spread evenly over the window.
STEP = 0.25


def plan(count: int, window: float, rate: float = 0.0) -> list[tuple[float, int]]:
    """The waves telling ``count`` clients to move: ``(offset_seconds, how_many)``, offsets rising."""
    if count <= 0:
        return []
    slots = max(1, int(window / STEP))
    sizes = [0] * slots
    for j in range(count):  # client j's share of the window, rounded down to its wave
        sizes[j * slots // count] += 1
    waves = [(i * window / slots, n) for i, n in enumerate(sizes) if n]
    if rate <= 0 or peak_per_second(waves) <= rate:
        return waves
    # Too many for the rate within the window: as fast as the rate allows.
    if rate * STEP >= 1:
        size, interval = math.floor(rate * STEP), STEP  # 1/STEP waves a second, each <= rate*STEP
    elif rate >= 1:
        size, interval = 1, 1.0 / math.floor(rate)
    else:
        size, interval = 1, 1.0 / rate
    return [(i * interval, min(size, count - i * size)) for i in range(math.ceil(count / size))]


def peak_per_second(waves: list[tuple[float, int]]) -> int:
    """The most clients told within any one second (a sliding, half-open window) of a plan."""
    best = 0
    for start, _ in waves:
        best = max(best, sum(n for offset, n in waves if start <= offset < start + 1.0))
    return best
