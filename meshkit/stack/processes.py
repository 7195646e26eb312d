"""The processes of one stack, found by its run directory, and how to stop them for good.

Circus starts every watcher's process in a session of its own, so a signal to
circusd (or to the terminal's process group) does not reach them, and if
circusd dies they live on as orphans. :func:`stack_processes` finds them all:
circusd's descendants, plus any process whose command line or
``MESHKIT_RUN_DIR`` names the run directory (what ``circus.ini`` gives every
process it starts).
"""

from __future__ import annotations

import os

import psutil


def stack_processes(run_dir: str, circusd_pid: int | None = None) -> list[psutil.Process]:
    """Every live process of the stack in ``run_dir`` (excluding this one)."""
    run_dir = os.path.abspath(run_dir)
    found: dict[int, psutil.Process] = {}
    if circusd_pid is not None:
        try:
            root = psutil.Process(circusd_pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me or proc.pid in found:
            continue
        try:
            if _belongs(proc, run_dir):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _belongs(proc: psutil.Process, run_dir: str) -> bool:
    if any(run_dir in part for part in proc.cmdline()):
        return True
    return bool(proc.environ().get("MESHKIT_RUN_DIR") == run_dir)


def terminate(procs: list[psutil.Process], grace: float) -> list[psutil.Process]:
    """SIGTERM ``procs``, SIGKILL whatever is left after ``grace`` s; return any that survived even that."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return list(alive)
