"""What the command line prints: tables, JSON results, errors and exit statuses.

Exit statuses of every ``meshkit`` command:

===  ====================================================================
0    done
1    the operation failed: a call error, an unreachable registry, ...
2    the command line or the settings are wrong (nothing was attempted)
130  interrupted (Ctrl-C)
===  ====================================================================
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from ..errors import CallError, ConfigError, HandlerError, MeshError, RegistryUnreachableError
from .localredis import LocalRedisError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def exit_status(exc: MeshError) -> int:
    """The exit status for a command that failed with ``exc``."""
    if isinstance(exc, (CallError, RegistryUnreachableError, LocalRedisError)):
        return EXIT_FAILED
    # Usage and settings errors, and (as before) the stack's and HAProxy's own errors.
    return EXIT_USAGE


def error_line(exc: MeshError) -> str:
    """The one line printed on stderr for ``exc``."""
    if isinstance(exc, CallError):
        return f"error: [{exc.code}] {exc}"
    return f"error: {exc}"


def error_payload(exc: MeshError) -> dict[str, Any]:
    """``exc`` as the ``"error"`` member of a ``--json`` answer: a stable ``code`` and a ``message``.

    Call errors carry their wire code (``no_instance``, ``timeout``,
    ``handler_error``, ...), the service and method, and for a handler
    error the remote exception's type name.
    """
    payload: dict[str, Any] = {"code": str(getattr(exc, "code", "error")), "message": str(exc)}
    if isinstance(exc, ConfigError):
        payload["code"] = "config"
    elif isinstance(exc, RegistryUnreachableError):
        payload["code"] = "registry_unreachable"
    if isinstance(exc, CallError):
        payload["message"] = exc.message
        payload["service"] = exc.service
        payload["method"] = exc.method
    if isinstance(exc, HandlerError) and exc.remote_type:
        payload["remote_type"] = exc.remote_type
    return payload


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def age(seconds: float) -> str:
    """A short age: ``42s``, ``17m``, ``5h``."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def json_default(value: Any) -> Any:
    """For ``json.dumps``: bytes as text (or ``{"base64": ...}``), anything else as its repr."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return repr(value)
