"""Telling the operator what happens, without ever depending on being heard.

``meshkit up`` runs in the foreground with its output often going through a
pipe (``make demo | tee log``) or a terminal that may close. When the reader
has gone away, a write raises ``BrokenPipeError`` (or ``OSError(EIO)`` on a
closed terminal); if that escaped, the command that was about to stop the
stack would die instead and leave it running. :func:`say` therefore never
raises: the first failed write points the stream's file descriptor at
``/dev/null``, so later writes, and the interpreter's flush at exit, succeed
silently.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def say(text: str, stream: TextIO | None = None) -> bool:
    """Print ``text`` (a line) to ``stream`` (default stderr) and flush; False if nobody can read it."""
    out = stream if stream is not None else sys.stderr
    try:
        print(text, file=out, flush=True)
        return True
    except (OSError, ValueError):  # ValueError: the stream was closed under us
        silence(out)
        return False


def silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so nothing written to it can fail any more."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
