"""Values that came from a remote peer, made safe to echo.

Anything a peer sends (a method name, a version, a target, a host, a JSON
line) may be megabytes long or nested a thousand deep. Before such a value
goes into an error message or a log line it passes through :func:`clip`,
which never raises and never returns more than ``limit`` characters (plus a
marker that says how much was cut). Log lines caused by remote input go
through a :class:`LogThrottle`, so a flood of bad messages writes one line
per cause per interval with a count, not one line per message.
"""

from __future__ import annotations

import logging
import reprlib
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CLIP_LIMIT", "LogThrottle", "clip"]

CLIP_LIMIT = 120  # characters of a remote value kept in an error or a log line

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = CLIP_LIMIT
_repr.maxother = CLIP_LIMIT
_repr.maxlong = 40
for _name in ("maxdict", "maxlist", "maxtuple", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_repr, _name, 8)


def clip(value: Any, limit: int = CLIP_LIMIT) -> str:
    """``value`` as at most ``limit`` characters of text, for an error or a log line.

    Strings are kept as they are (not quoted) when short enough; anything else
    is shown with a depth- and size-bounded ``repr``. A longer text is cut and
    ends with ``…(+N chars)``. Never raises, whatever ``value`` is (a
    1,000-deep list, an object whose ``__repr__`` fails, bytes of any size).
    """
    try:
        if isinstance(value, str):
            text = value if len(value) <= limit else value[:limit]
            total = len(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value[: limit + 1])
            text = repr(raw)
            total = len(value) if len(value) > limit else len(text)
        else:
            text = _repr.repr(value)
            total = len(text)
    except Exception:  # a hostile __repr__, a RecursionError: still say something
        return f"<unprintable {type(value).__name__}>"
    if total > limit or len(text) > limit:
        cut = text[:limit]
        return f"{cut}…(+{max(total - limit, 1)} chars)"
    return text


class LogThrottle:
    """One log line per cause per ``interval`` seconds, with the count of the rest.

    ``log(cause, level, msg, *args)`` writes at once the first time a cause
    is seen in an interval; later calls in the same interval are only
    counted, and the next line written for that cause says how many were
    suppressed (``suppressed=N`` in its extras). ``cause`` should be a short
    key chosen by the caller (an error code, a handler name), never remote
    text. At most ``max_causes`` causes are remembered; past that the oldest
    is forgotten, so the throttle's memory is bounded whatever peers send.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_causes: int = 256,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_causes = max_causes
        self._causes: dict[str, list[float | int]] = {}  # cause -> [window start, suppressed]

    def log(self, cause: str, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` for ``cause`` unless it was logged within the interval; return whether it was."""
        now = self.clock()
        entry = self._causes.get(cause)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] = int(entry[1]) + 1
            return False
        suppressed = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._causes) >= self.max_causes:
            self._causes.pop(next(iter(self._causes)))
        self._causes[cause] = [now, 0]
        extra = dict(kwargs.pop("extra", None) or {})
        if suppressed:
            extra["suppressed"] = suppressed
        self.logger.log(level, msg, *args, extra=extra or None, **kwargs)
        return True

    def suppressed(self, cause: str) -> int:
        """How many lines for ``cause`` were counted but not written in the current interval."""
        entry = self._causes.get(cause)
        return int(entry[1]) if entry is not None else 0
