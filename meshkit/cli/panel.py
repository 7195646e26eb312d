"""``meshkit panel``: the browser control panel (docs/panel.md).

``meshkit panel [--host H] [--port N] [--run-dir DIR] [--refresh S] [--tap-max-rps N]``
    Serve the panel on ``H:N`` (default ``127.0.0.1``, a port the kernel
    chooses) and print its URL. When the run directory exists (``--run-dir``,
    ``MESHKIT_RUN_DIR`` or ``.run``) it writes its URL to ``DIR/panel.url``
    (what ``meshkit status`` prints) and shows the Circus watchers and
    HAProxy servers running from there; without ``MESHKIT_REDIS_URL`` it
    reads the registry of the stack there. Each option's
    default may also come from ``[services.panel]`` in the settings file or a
    ``MESHKIT_PANEL_<OPTION>`` variable (``MESHKIT_PANEL_PORT=8700``).
    Listening on anything but loopback prints a warning: the panel has no
    login, and anyone who reaches it sees the mesh (use an ssh tunnel).
    Runs until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from typing import Any

from .mesh import registry_choice


def add_commands(sub: Any) -> None:
    """Register ``meshkit panel``."""
    panel = sub.add_parser("panel", help="serve the browser control panel (loopback by default)")
    panel.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    panel.add_argument("--port", type=int, help="port (default 0: the kernel chooses)")
    panel.add_argument("--run-dir", help="the stack's run directory (default: $MESHKIT_RUN_DIR or .run)")
    panel.add_argument("--refresh", type=float, help="seconds between two readings of the mesh (default 2)")
    panel.add_argument("--tap-max-rps", type=float, help="events per second one tab's tap may bring (default 20)")
    panel.set_defaults(func=cmd_panel)


def cmd_panel(args: argparse.Namespace) -> int:
    from ..logs import configure_logging
    from ..panel.webserver import PanelOptions, serve

    settings = registry_choice(args, check=False).settings
    options = settings.section(PanelOptions, "panel")
    changes = {name: value for name, value in (("host", args.host), ("port", args.port), ("refresh", args.refresh),
                                               ("tap_max_rps", args.tap_max_rps)) if value is not None}
    options = dataclasses.replace(options, **changes)  # PanelOptions checks them (ConfigError)
    run_dir = os.path.abspath(args.run_dir or settings.run_dir)
    # The run directory gets the URL file; Circus and HAProxy are shown when their sockets are there.
    stack = run_dir if os.path.isdir(run_dir) else None
    configure_logging(settings, "panel", str(os.getpid()))
    if not options.loopback:
        print(f"warning: the panel listens on {options.host}: it has no login, anyone who reaches it sees "
              "the mesh; prefer loopback and an ssh tunnel (docs/panel.md)", file=sys.stderr, flush=True)

    def ready(url: str) -> None:
        print(f"panel: {url}", flush=True)

    asyncio.run(serve(settings, options, stack, ready))
    return 0
