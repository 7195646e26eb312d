"""Timed marks that test services leave for their test: one line per event in a shared file.

A service appends ``<field> <field> ... <monotonic time>`` to the file named by
an environment variable; the test reads the lines of every process and
compares their times with its own readings (``time.monotonic`` is the
machine's one ``CLOCK_MONOTONIC``, shared by every process).
"""

from __future__ import annotations

import os
import time


def append_mark(log_variable: str, *fields: object) -> None:
    """Append one line to ``$log_variable``: one ``write`` on an ``O_APPEND`` file, so lines of
    several processes never interleave."""
    line = " ".join(str(field) for field in fields) + f" {time.monotonic():.6f}\n"
    fd = os.open(os.environ[log_variable], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
