"""Running ``circusd`` for ``meshkit up``, and reading why it did not start.

``python -m meshkit.stack.circusd circus.ini`` is Circus's own ``circusd``
with one logging filter (:class:`SkippedCheckFilter`) installed first.

Circus 0.19 runs its periodic process check (``Arbiter.manage_watchers``,
every ``check_delay``) under the same exclusive lock as the commands that
change the stack (``circus/util.py``, ``synchronized``). While a command that
waits for graceful stops runs (``stop``, ``quit``, a scale-down, each step of
a rolling restart), every tick of the check is refused with ``ConflictError:
arbiter is already running <cmd> command`` and the event loop logs that with
a full traceback, several per second, although nothing went wrong: the check
simply runs at the next tick once the command has finished. The filter drops
exactly those records, so that ``circusd.log`` shows real errors only.

:func:`startup_failure` turns what circusd logged while failing to start
(for example ``Could not bind 127.0.0.1:3333`` and ``[Errno 98] Address already
in use``; circusd then exits with status 0) into one line for the operator.
"""

from __future__ import annotations

import logging
import re
import sys

from ..untrusted import clip

_ERROR_LINE = re.compile(r"\[(?:ERROR|CRITICAL)\] (?P<message>.*)$")


class SkippedCheckFilter(logging.Filter):
    """Drops the event loop's report of a periodic process check refused because a command is running."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "ConflictError":
            return True
        return "manage_watchers" not in record.getMessage()


def startup_failure(log_text: str, limit: int = 5) -> str | None:
    """The ERROR lines of a circusd log (the part written since this start), joined; None if there are none."""
    messages: list[str] = []
    for line in log_text.splitlines():
        match = _ERROR_LINE.search(line)
        if match is None:
            continue
        message = match.group("message").strip()
        # Circus words a caught exception as "exception <text> caught".
        if message.startswith("exception ") and message.endswith(" caught"):
            message = message[len("exception "):-len(" caught")]
        if message not in messages:
            messages.append(clip(message, 200))
    if not messages:
        return None
    reason = "; ".join(messages[-limit:])
    if "Address already in use" in reason:
        reason += (" (another program, or another stack, listens there: stop it or choose another port "
                   "with MESHKIT_STRATUM_PORT; 0 lets the kernel choose)")
    return reason


def main() -> None:
    """circusd's command line, with :class:`SkippedCheckFilter` on the event loop's logger."""
    logging.getLogger("tornado.application").addFilter(SkippedCheckFilter())
    from circus.circusd import main as circusd_main

    sys.argv[0] = "circusd"
    circusd_main()


if __name__ == "__main__":
    main()
