"""Where a running panel can be reached: the URL it writes into the stack's run directory.

The panel binds a port the kernel chooses (unless configured), so nobody
can know its URL in advance: once bound it writes ``<run_dir>/panel.url``
(:func:`write_url`, atomically), removes it when it stops, and ``meshkit
status`` / ``meshkit up`` read it (:func:`read_url`, :func:`wait_for_url`).
Importing this module imports no web library.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

URL_FILE = "panel.url"
MAX_URL = 200  # characters; a longer or odd file is not a URL we wrote


def url_path(run_dir: str) -> Path:
    return Path(run_dir) / URL_FILE


def write_url(run_dir: str, url: str) -> None:
    tmp = url_path(run_dir).with_suffix(".tmp")
    tmp.write_text(url + "\n")
    os.replace(tmp, url_path(run_dir))


def remove_url(run_dir: str) -> None:
    try:
        url_path(run_dir).unlink()
    except OSError:
        pass


def read_url(run_dir: str) -> str | None:
    """The URL the panel of ``run_dir`` wrote, or None if there is none (or it is not one)."""
    try:
        text = url_path(run_dir).read_text().strip()
    except OSError:
        return None
    return text if text.startswith("http://") and len(text) <= MAX_URL and text.isprintable() else None


def wait_for_url(run_dir: str, timeout: float) -> str | None:
    """:func:`read_url`, waiting up to ``timeout`` seconds for the panel to write it."""
    deadline = time.monotonic() + timeout
    while (url := read_url(run_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a file the panel writes once bound
    return url
