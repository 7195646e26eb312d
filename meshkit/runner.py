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
import signal
import sys

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


def run(cls: type[Service], settings: Settings | None = None) -> int:
    """Run one instance of ``cls`` until SIGTERM/SIGINT; return the exit code."""
    settings = settings or Settings.load()
    return asyncio.run(_serve(cls, settings))


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
