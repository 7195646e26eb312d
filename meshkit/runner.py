"""Running one service instance as a process: logging, signals, exit codes.

``run(ServiceClass, settings)`` is what ``meshkit run MODULE:CLASS`` does:
configure logging (the only place meshkit does), start the instance, and on
SIGTERM or SIGINT stop it gracefully (see :meth:`Service.stop`) and return
0. A second signal during the drain skips the rest of the grace period.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from . import loops
from .config import Settings
from .errors import ConfigError
from .logs import configure_logging
from .service import Service

log = logging.getLogger("meshkit.runner")


def load_class(target: str) -> type[Service]:
    """Import ``module:Class`` and check it is a :class:`Service` subclass."""
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"expected MODULE:CLASS, got {target!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let `meshkit run services.echo:Echo` work from the project root
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(f"{target!r} is not a meshkit.Service subclass")
    return cls


def run(cls: type[Service], settings: Settings | None = None, *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """Run one instance of ``cls`` until SIGTERM/SIGINT; return the exit code.

    The event loop is uvloop's (see :mod:`meshkit.loops`) unless
    ``loop_factory`` makes another (``asyncio.new_event_loop``, to compare).

    If plain handlers are still running in their threads once the instance
    has stopped (the grace period ran out), the process exits at once with
    that code instead of returning: Python cannot stop a thread, and waiting
    for them at interpreter exit would stretch the grace period without end.
    """
    settings = settings or Settings.load()
    code = loops.run(_serve(cls, settings), factory=loop_factory)
    _exit_if_threads_remain(code)
    return code


def _exit_if_threads_remain(code: int, wait: float = 0.5) -> None:
    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            # Idle pool workers exit by themselves within moments of shutdown.
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon
             and t is not threading.current_thread()]
    if stuck:
        log.warning("exiting with %d handler threads still running: %s", len(stuck), ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


async def _serve(cls: type[Service], settings: Settings) -> int:
    service = cls(settings)
    configure_logging(service.settings, service.name, service.instance_id)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    stop_task: asyncio.Task[None] | None = None
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        nonlocal stop_task
        if stop_task is None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop_requested.set()
        else:
            log.warning("second %s: skipping the rest of the drain", signal.Signals(signum).name)
            stop_task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await service.start()
    except ConfigError as exc:
        # A setting is wrong: the message says which, a traceback would bury it.
        log.error("failed to start: %s", exc, extra={"error": str(exc)})
        await service.kill()
        return 1
    except Exception:
        log.exception("failed to start")
        await service.kill()
        return 1
    await stop_requested.wait()
    stop_task = asyncio.create_task(service.stop())
    try:
        await stop_task
    except asyncio.CancelledError:
        await service.kill()
    for sig in signals:
        loop.remove_signal_handler(sig)
    return 0
