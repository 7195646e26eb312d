"""Finding the system programs meshkit starts: ``haproxy``, ``redis-server``, ...

One search for every caller (the HAProxy supervisor, ``meshkit redis``, the
test kit, the benchmarks): ``PATH`` first, then the directories where Debian
installs system programs, which a non-root user's ``PATH`` often lacks.
"""

from __future__ import annotations

import os
import shutil

from .errors import ConfigError

# Where Debian puts system programs: ``haproxy`` lands in /usr/sbin, often off
# a non-root user's PATH.
PROGRAM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin")


def find_program(name: str) -> str:
    """Full path of the system program ``name``: on PATH, else in :data:`PROGRAM_DIRS`.

    Raises :class:`~meshkit.errors.ConfigError` if it is not installed.
    """
    found = shutil.which(name)
    if found:
        return found
    for directory in PROGRAM_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(f"{name} is not installed (Debian: apt-get install {name})")
