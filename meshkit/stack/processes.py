"""The processes of one stack, found by its run directory, and how to stop them for good.

Circus starts every watcher's process in a session of its own, so a signal to
circusd (or to the terminal's process group) does not reach them, and if
circusd dies they live on as orphans. :func:`stack_processes` finds them all:
circusd's descendants, plus any process whose environment carries
:data:`STACK_MARKER` naming the run directory. ``meshkit up`` sets that
variable in circusd's environment only, and every watcher copies it
(``copy_env``), so it marks exactly the stack's processes. It is not
``MESHKIT_RUN_DIR``: operators export that in their own shells (the welcome
text suggests it), and a shell, an editor or ``tail -f .run/gateway.log`` is
not part of the stack. The embedded Redis is the one exception: it rewrites
its process title over its environment, so it is recognised by its title,
which names its socket, ``<run_dir>/redis.sock``.
"""

from __future__ import annotations

import os

import psutil

STACK_MARKER = "MESHKIT_STACK"


def stack_processes(run_dir: str, circusd_pid: int | None = None) -> list[psutil.Process]:
    """Every live process of the stack in ``run_dir`` (excluding this one and its ancestors)."""
    run_dir = os.path.abspath(run_dir)
    found: dict[int, psutil.Process] = {}
    if circusd_pid is not None:
        try:
            root = psutil.Process(circusd_pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for proc in psutil.process_iter():
        if proc.pid in spared or proc.pid in found:
            continue
        try:
            if _belongs(proc, run_dir):
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for pid in spared:
        found.pop(pid, None)
    return list(found.values())


def _belongs(proc: psutil.Process, run_dir: str) -> bool:
    if proc.environ().get(STACK_MARKER) == run_dir:
        return True
    title = " ".join(proc.cmdline())
    return title.startswith("redis-server") and os.path.join(run_dir, "redis.sock") in title


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
