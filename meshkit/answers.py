"""How the outcome of a request an instance served becomes its answer.

:class:`Answers` turns a handler's return value into a REPLY (or ACK) and
whatever it raised into an ERROR, with the code the server counts in its
metrics. It decides what the caller is told and what is logged:

* a result MessagePack cannot encode is ``handler_error``; one larger than
  ``max_message_size`` is ``reply_too_large``;
* arguments that do not fit are ``bad_arguments`` (a warning, throttled);
* a handler cancelled at its deadline is ``deadline_exceeded`` (info);
* a :class:`~meshkit.errors.RefusedError` (or a subclass, with its own
  registered code) is answered with its code and message, logged at debug
  only: a refusal is an answer, not a failure;
* anything else is ``handler_error`` with the exception's class name, its
  traceback only in debug mode, and an error log line (throttled per
  handler, never per topic or other value the peer chose).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from . import wire
from .codes import ErrorCode
from .config import Settings
from .errors import RefusedError
from .invoke import BadArguments
from .timing import DeadlineCancel
from .untrusted import LogThrottle, clip

log = logging.getLogger("meshkit.server")

Outcome = tuple[str | None, list[bytes]]  # (error code or None, frames to send)


class Answers:
    """Builds answers for one server (``settings`` for sizes and debug, ``throttle`` for its log lines)."""

    def __init__(self, settings: Settings, throttle: LogThrottle) -> None:
        self.settings = settings
        self._throttle = throttle

    def reply(self, header: wire.Header, result: Any) -> Outcome:
        """The REPLY of a CALL whose handler returned ``result``."""
        try:
            frames = wire.encode_reply(header.id, result)
        except (TypeError, ValueError, OverflowError) as exc:
            code = ErrorCode.HANDLER_ERROR
            self._throttle.log(f"unencodable:{header.name}", logging.ERROR,
                               "%s returned a value MessagePack cannot encode: %s", header.name, clip(exc))
            return code, wire.encode_error(header.id, code, f"result cannot be encoded: {clip(exc)}",
                                           type(exc).__name__)
        limit = self.settings.max_message_size
        if len(frames[1]) > limit:
            why = f"result of {len(frames[1])} bytes exceeds max_message_size {limit}"
            return ErrorCode.REPLY_TOO_LARGE, wire.encode_error(header.id, ErrorCode.REPLY_TOO_LARGE, why)
        return None, frames

    def ack(self, header: wire.Header) -> Outcome:
        """The ACK of a PUSH whose handlers all ran."""
        return None, wire.encode_ack(header.id)

    def failure(self, header: wire.Header, cause: str, exc: Exception) -> Outcome:
        """The ERROR for ``exc``, raised while serving ``header`` by the handler named ``cause``.

        ``cause`` (the method, or a subscription's pattern) is what the log
        lines are throttled by: a prefix subscriber may see endless distinct
        topics, and each must not earn its own line.
        """
        if isinstance(exc, BadArguments):
            self._throttle.log(f"bad_arguments:{cause}", logging.WARNING, "bad arguments for %s: %s",
                               clip(header.name), exc)
            return ErrorCode.BAD_ARGUMENTS, wire.encode_error(header.id, ErrorCode.BAD_ARGUMENTS, str(exc))
        if isinstance(exc, DeadlineCancel):
            self._throttle.log(f"deadline:{cause}", logging.INFO, "%s cancelled at its deadline", clip(header.name))
            return ErrorCode.DEADLINE_EXCEEDED, wire.encode_error(header.id, ErrorCode.DEADLINE_EXCEEDED,
                                                                 "deadline passed while running")
        if isinstance(exc, RefusedError):
            log.debug("%s refused: %s", clip(header.name), clip(exc.message))
            return exc.code, wire.encode_error(header.id, exc.code, clip(exc.wire_message, wire.MAX_ERROR_MESSAGE),
                                               type(exc).__name__)
        message = clip(str(exc), wire.MAX_ERROR_MESSAGE)
        self._throttle.log(f"handler_error:{cause}", logging.ERROR, "handler %s raised %s: %s",
                           clip(header.name), type(exc).__name__, message, exc_info=exc)
        tb = clip("".join(traceback.format_exception(exc)), wire.MAX_ERROR_TRACEBACK) if self.settings.debug else None
        return ErrorCode.HANDLER_ERROR, wire.encode_error(header.id, ErrorCode.HANDLER_ERROR, message,
                                                          type(exc).__name__, tb)
