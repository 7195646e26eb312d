"""Structured logging: one handler on the root logger, installed by the runner.

Importing this module configures nothing. :func:`configure_logging` installs
exactly one handler on the root logger (replacing the one it installed
before, so calling it again is safe) and sets the root level from the
service's settings; :func:`reset_logging` takes it away again. Other handlers
on the root logger, and every other logger's own level (``asyncio``, ``zmq``,
``urllib3`` ...), are left as they are: those loggers follow the root level.

The JSON format writes one object per line::

    {"time":"2024-05-01T12:00:01.123Z","level":"INFO","service":"echo",
     "instance":"ab12cd","logger":"meshkit.router","event":"served",
     "trace_id":"4bf9...","span_id":"00f0...","method":"ping"}

``trace_id`` and ``span_id`` come from :func:`meshkit.context.current_call`
and are ``null`` outside a call. Fields passed with ``extra={...}`` follow;
values JSON cannot hold are written as ``str(value)``, and an extra whose key
is one of the standard fields is written as ``extra_<key>`` so that it never
hides one. ``exc`` holds the formatted traceback when there is one.

The text format is one readable line for development::

    12:00:01.123 INFO  echo/ab12cd served method=ping [trace=4bf92f35]

Both formats bound what one record writes to ``max_line`` characters
(``Settings.max_log_line``, 16 KiB), traceback included, as a last line of
defence behind the clipping of remote values where they are logged: a
longer ``event`` keeps its start, each long extra its start, a traceback
its end (the frame that raised), and the JSON record gets
``"truncated":true``. A JSON line always stays one valid JSON object.

See ``docs/logging.md``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from .config import Settings
from .context import current_call
from .errors import ConfigError
from .untrusted import clip

__all__ = ["configure_logging", "reset_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(
    {
        "name", "msg", "args", "levelname", "levelno", "pathname", "filename",
        "module", "exc_info", "exc_text", "stack_info", "lineno", "funcName",
        "created", "msecs", "relativeCreated", "thread", "threadName",
        "processName", "process", "taskName", "message", "asctime",
    }
)  # fmt: skip
_STANDARD_FIELDS = frozenset(
    {"time", "level", "service", "instance", "logger", "event", "trace_id", "span_id", "exc"}
)
MAX_LINE = 16 * 1024  # default of Settings.max_log_line
_EXTRA_LIMIT = 512  # characters kept of one extra's value in a line that was too long
_MARK = 32  # room for the "…(+N chars)" marks of what was cut


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    # Cached on the record as logging.Formatter does, so a second handler
    # does not format the same traceback again.
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text
    if record.stack_info:
        stack = formatter.formatStack(record.stack_info)
        text = f"{text}\n{stack}" if text else stack
    return text or None


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def _tail(text: str, limit: int) -> str:
    """The last ``limit`` characters of ``text``, marked as cut when it was longer."""
    if len(text) <= limit:
        return text
    return f"…(-{len(text) - limit} chars){text[-limit:]}"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (fields in the module doc)."""

    def __init__(self, service: str, instance: str, max_line: int = MAX_LINE) -> None:
        super().__init__()
        self._service = service
        self._instance = instance
        self._max_line = max_line

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line without the trailing newline."""
        call = current_call()
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "instance": self._instance,
            "logger": record.name,
            "event": record.getMessage(),
            "trace_id": call.trace.trace_id if call is not None else None,
            "span_id": call.trace.span_id if call is not None else None,
        }
        for key, value in _extras(record).items():
            out["extra_" + key if key in _STANDARD_FIELDS else key] = value
        exc = _exception_text(self, record)
        if exc is not None:
            out["exc"] = exc
        line = _dumps(out)
        if len(line) <= self._max_line:
            return line
        return self._shortened(out)

    def _shortened(self, out: dict[str, Any]) -> str:
        # Event a quarter of the line, traceback a half, extras a few hundred
        # characters each; if code passed that many extras, drop them.
        quarter = self._max_line // 4 - _MARK
        short: dict[str, Any] = {}
        for key, value in out.items():
            if key == "event":
                short[key] = clip(value, quarter)
            elif key == "exc":
                short[key] = _tail(value, self._max_line // 2 - _MARK)
            elif key in _STANDARD_FIELDS or value is None or isinstance(value, (bool, int, float)):
                short[key] = value
            else:
                short[key] = clip(value, _EXTRA_LIMIT)
        short["truncated"] = True
        line = _dumps(short)
        if len(line) > self._max_line:
            core = {k: short[k] for k in _STANDARD_FIELDS if k in short and k != "exc"}
            core["truncated"] = True
            line = _dumps(core)
        return line


def _dumps(out: dict[str, Any]) -> str:
    try:
        return json.dumps(out, default=str, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        # A value json cannot take even via str() (a dict with tuple keys, NaN,
        # a cycle): make each field safe on its own rather than lose the line.
        safe = {k: _json_safe(v) for k, v in out.items()}
        return json.dumps(safe, default=str, allow_nan=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Formats a record as one readable line (local time), traceback below it."""

    def __init__(self, service: str, instance: str, max_line: int = MAX_LINE) -> None:
        super().__init__()
        self._where = f"{service}/{instance}"
        self._max_line = max_line

    def format(self, record: logging.LogRecord) -> str:
        """The record as ``HH:MM:SS.mmm LEVEL service/instance event k=v [trace=...]``."""
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d} {record.levelname:<5} {self._where}"]
        parts.append(record.getMessage())
        parts.extend(f"{k}={_text_value(v)}" for k, v in _extras(record).items())
        call = current_call()
        if call is not None:
            parts.append(f"[trace={call.trace.trace_id[:8]}]")
        line = " ".join(parts)
        exc = _exception_text(self, record)
        if len(line) + len(exc or "") + 1 > self._max_line:
            line = clip(line, self._max_line // 2 - _MARK)
            exc = _tail(exc, self._max_line // 2 - _MARK) if exc is not None else None
        return f"{line}\n{exc}" if exc is not None else line


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "=\"'" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class _LineHandler(logging.Handler):
    """Writes each formatted record and a newline to a stream, flushing each line.

    Remembers the root level it replaced so that :func:`reset_logging` can put
    it back.
    """

    def __init__(self, stream: TextIO, previous_level: int) -> None:
        super().__init__()
        self.stream = stream
        self.previous_level = previous_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _level(name: str) -> int:
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    value = logging.getLevelName(text)
    if not isinstance(value, int):
        raise ConfigError(f"log_level must be a logging level name, got {name!r}")
    return value


def _remove_installed(root: logging.Logger) -> _LineHandler | None:
    found: _LineHandler | None = None
    for handler in list(root.handlers):
        if isinstance(handler, _LineHandler):
            root.removeHandler(handler)
            handler.flush()
            handler.close()
            found = found or handler
    return found


def configure_logging(
    settings: Settings, service: str, instance: str, stream: TextIO | None = None
) -> None:
    """Send this process's logs to ``stream`` (default: ``sys.stderr``).

    Installs one handler on the root logger, replacing the one a previous call
    installed, and sets the root level to ``settings.for_service(service).log_level``.
    The format is ``settings.log_format`` (``"json"`` or ``"text"``). An unknown
    level name raises :class:`ConfigError` and leaves logging as it was.
    """
    own = settings.for_service(service)
    level = _level(own.log_level)
    formatter: logging.Formatter
    if own.log_format == "text":
        formatter = TextFormatter(service, instance, own.max_log_line)
    else:
        formatter = JsonFormatter(service, instance, own.max_log_line)
    root = logging.getLogger()
    old = _remove_installed(root)
    handler = _LineHandler(
        sys.stderr if stream is None else stream,
        old.previous_level if old is not None else root.level,
    )
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)


def reset_logging() -> None:
    """Remove the handler :func:`configure_logging` installed and restore the root level."""
    root = logging.getLogger()
    old = _remove_installed(root)
    if old is not None:
        root.setLevel(old.previous_level)
