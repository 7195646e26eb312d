"""The HAProxy master of a run directory: started detached, found again, stopped only on purpose.

HAProxy runs in master-worker mode: ``haproxy -W -S <master socket> -p <pid
file> -f <config>``. The master re-executes itself on ``reload`` and forks a
new worker that takes the listening sockets over from the old one, which
finishes its connections (up to ``hard-stop-after``).

**HAProxy outlives whoever started it.** :meth:`HAProxyMaster.start` starts
it *detached*: a shell in between starts it in the background and exits at
once, so the master is nobody's child, in a session of its own. Nothing that
stops or kills the sync process reaches it: not a Ctrl-C, not a SIGTERM, not
Circus SIGKILLing the sync's process tree at its ``graceful_timeout``. Its
output goes to ``haproxy.log`` next to its configuration. Its pid file and
master socket stay in the run directory, where the next sync finds it
(:func:`find_master`) and attaches to it. Only :func:`stop_haproxy` stops it
(``meshkit haproxy stop``, called by ``meshkit down``).

**The listeners are never closed while clients come.** Frontends bound with
``fd@N`` use file descriptors the starter passes down; the master keeps them
across reloads, and since Circus (or whoever bound them) keeps them too, a
master started later gets the very same listening socket. A master started
while another still runs (a *takeover*: the old one lacks a descriptor the
configuration needs, or holds other sockets under those numbers) is given
``-x <stats socket>``, so it takes the ``host:port`` listeners over from the
running worker instead of binding anew (``expose-fd listeners``); only then is
the old master soft-stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..programs import find_program
from .errors import HAProxyError

log = logging.getLogger("meshkit.haproxy.process")

STOP_TIMEOUT = 10.0  # default seconds stop_haproxy may take: soft, then hard in the last HARD_STOP_GRACE
HARD_STOP_GRACE = 2.0  # seconds of a stop budget kept for the hard stop (SIGTERM, then SIGKILL)
REAP_TIMEOUT = 1.0  # seconds a SIGKILLed master may take to disappear
LAUNCH_TIMEOUT = 5.0  # seconds the launching shell may take to report the master's pid
LOG_NAME = "haproxy.log"  # HAProxy's own output, next to its configuration
LOADED_NAME = "haproxy.loaded"  # next to it too: the structure fingerprint of what HAProxy runs
# The names RuntimePaths.in_dir gives the configuration and the pid file (a unit test pins them equal).
CONFIG_NAME = "haproxy.cfg"
PID_NAME = "haproxy.pid"

# The shell in between: HAProxy in the background with its output appended
# to the log, then the shell prints its pid and exits, orphaning it.
_LAUNCHER = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def find_haproxy() -> str:
    """Path of the ``haproxy`` program; raises :class:`~meshkit.errors.ConfigError` if not installed."""
    return find_program("haproxy")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited master nobody reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] not in ("Z", "X")


def find_master(config_file: Path, pid_file: Path) -> int | None:
    """Pid of the live HAProxy master (``-W``) that runs ``config_file``, as named in ``pid_file``; else None.

    A pid file left by a dead master, or whose pid now belongs to another
    program, names nothing.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if os.fsencode(str(config_file)) in cmdline and b"-W" in cmdline and alive(pid):
        return pid
    return None


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid``, or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def masters_running(config_file: Path) -> list[int]:
    """Pids of every live HAProxy master (``-W``) running ``config_file``, found in /proc, workers left out.

    One run directory has one master; any other is stale (a sync killed
    midway through a takeover leaves two).
    """
    wanted = os.fsencode(str(config_file))
    parents: dict[int, int | None] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in cmdline and b"-W" in cmdline and alive(int(entry)):
            parents[int(entry)] = parent_of(int(entry))
    # A worker's parent is a master; the newest master last (pids are not reused quickly).
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


def holds_sockets(pid: int, fds: Sequence[int]) -> bool:
    """Whether process ``pid`` has, under each number in ``fds``, the very socket this process has there."""
    for fd in fds:
        try:
            mine, theirs = os.fstat(fd), os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return False
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return False
    return True


class HAProxyMaster:
    """The HAProxy master of one run directory, whoever started it.

    :attr:`pid` is the master this object drives, or None; :meth:`adopt`
    takes the one already running there, :meth:`start` launches a new one
    (detached; readiness is the master CLI and the stats socket answering,
    which the caller waits for). Nothing here stops HAProxy except
    :meth:`retire` of an older master after a takeover.
    """

    def __init__(
        self,
        config_file: Path,
        master_socket: Path,
        pid_file: Path,
        stats_socket: Path,
        haproxy: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.config_file = config_file
        self.master_socket = master_socket
        self.pid_file = pid_file
        self.stats_socket = stats_socket
        self.haproxy = haproxy or find_haproxy()
        self.pass_fds = tuple(pass_fds)
        self.log_file = config_file.parent / LOG_NAME
        self.pid: int | None = None
        self.died: int | None = None  # pid of the last master seen dead (for the log)

    def running(self) -> bool:
        """Whether the master this object drives is alive (None counts as not)."""
        if self.pid is not None and not alive(self.pid):
            self.died, self.pid = self.pid, None
        return self.pid is not None

    def find(self) -> int | None:
        """The live master in the run directory (this object's or another's), or None."""
        return find_master(self.config_file, self.pid_file)

    def adopt(self, pid: int) -> None:
        """Drive the running master ``pid`` from now on (the pid file names it, for whoever comes next)."""
        self.pid = pid
        if find_master(self.config_file, self.pid_file) != pid:
            with contextlib.suppress(OSError):
                _replace(self.pid_file, f"{pid}\n")

    def others(self) -> list[int]:
        """Every other live master running this configuration (stale: see :func:`masters_running`)."""
        return [pid for pid in masters_running(self.config_file) if pid != self.pid]

    def choose(self, answering_worker: int | None) -> int | None:
        """The running master to drive, if any: the parent of ``answering_worker`` (the worker that
        answers on the stats socket), else the one the pid file names, else the newest.

        Two run only after a takeover cut short; the one whose worker holds
        the control sockets is the one a sync can drive.
        """
        masters = masters_running(self.config_file)
        if answering_worker is not None and (parent := parent_of(answering_worker)) in masters:
            return parent
        named = find_master(self.config_file, self.pid_file)
        return named if named in masters else (masters[-1] if masters else None)

    def loaded_structure(self) -> str | None:
        """The structure fingerprint the last start or reload that worked recorded (:meth:`note_loaded`).

        Not the configuration file's own: a sync stopped between writing the
        file and reloading HAProxy leaves a file HAProxy does not run; the
        next sync then reloads it.
        """
        with contextlib.suppress(OSError):
            return (self.config_file.parent / LOADED_NAME).read_text().strip() or None
        return None

    def note_loaded(self, fingerprint: str) -> None:
        """Record that HAProxy now runs the structure ``fingerprint``."""
        path = self.config_file.parent / LOADED_NAME
        try:
            _replace(path, fingerprint + "\n")
        except OSError as exc:  # the next sync then reloads once, which refuses nothing
            log.warning("cannot record the loaded structure in %s: %s", path, exc)

    def fall_back(self, previous: int) -> None:
        """A takeover failed: end the new master if it runs, and drive ``previous`` again.

        The pid file names ``previous`` again (the new master had written its
        own), so the next sync finds the master that serves.
        """
        if self.pid is not None and self.pid != previous:
            log.error("the new haproxy master %d did not come up; keeping master %d", self.pid, previous)
            kill_haproxy(self.pid)
        self.adopt(previous)

    def can_adopt(self, pid: int) -> bool:
        """Whether master ``pid`` holds every listening socket the configuration binds by ``fd@N``."""
        return holds_sockets(pid, self.pass_fds)

    async def start(self, takeover: bool = False) -> int:
        """Launch a new master, detached; return its pid.

        With ``takeover`` it fetches the listening sockets of the worker
        answering on the stats socket (``-x``) instead of binding them. Raises
        :class:`~meshkit.haproxy.errors.HAProxyError` if it cannot be launched.
        """
        argv = [
            self.haproxy, "-W",
            "-S", f"{self.master_socket},mode,600",
            "-p", str(self.pid_file),
            "-f", str(self.config_file),
        ]
        if takeover:
            argv += ["-x", str(self.stats_socket)]
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _LAUNCHER, "meshkit-haproxy", str(self.log_file), *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=self.pass_fds, start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(shell.communicate(), LAUNCH_TIMEOUT)
            pid = int(out.split()[0])
        except (asyncio.TimeoutError, ValueError, IndexError):
            with contextlib.suppress(ProcessLookupError):
                shell.kill()
            raise HAProxyError(f"could not launch haproxy: {' '.join(argv)}") from None
        self.pid = pid
        log.info("started haproxy master (pid %d, output in %s): %s", pid, self.log_file, " ".join(argv))
        return pid

    def retire(self, pid: int) -> None:
        """Soft-stop an older master after a takeover (SIGUSR1: it finishes its connections, then exits)."""
        if pid != self.pid and alive(pid):
            log.info("soft-stopping the previous haproxy master (pid %d)", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGUSR1)


def haproxy_master(run_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the live HAProxy master of ``run_dir`` (running its ``haproxy.cfg``); None if none runs."""
    base = Path(run_dir).absolute()
    return find_master(base / CONFIG_NAME, base / PID_NAME)


def stop_haproxy(run_dir: str | os.PathLike[str], timeout: float = STOP_TIMEOUT) -> str:
    """Stop the HAProxy of ``run_dir`` (the master running its ``haproxy.cfg``) and its workers; return how.

    What ``meshkit down`` calls once the stack's processes have stopped. See
    :func:`stop_master`.
    """
    base = Path(run_dir).absolute()
    return stop_master(base / CONFIG_NAME, base / PID_NAME, timeout)


def stop_master(config_file: Path, pid_file: Path, timeout: float = STOP_TIMEOUT) -> str:
    """Stop the HAProxy master running ``config_file`` (pid in ``pid_file``) and its workers; return how.

    Blocking. The soft stop first (SIGUSR1: workers stop listening and finish
    their connections, then the master exits), repeated every second until
    :data:`HARD_STOP_GRACE` seconds of ``timeout`` are left (a master
    re-executing itself drops a signal); then a hard stop (SIGTERM:
    connections are closed); at ``timeout``, SIGKILL to its process group
    (workers included). Returns within ``timeout`` + :data:`REAP_TIMEOUT`
    seconds: ``"none"`` (no master was running), ``"soft"``, ``"hard"`` or
    ``"killed"``.
    """
    pid = find_master(config_file, pid_file)
    if pid is None:
        return "none"
    deadline = time.monotonic() + timeout
    soft_deadline = deadline - HARD_STOP_GRACE
    log.info("stopping haproxy softly (SIGUSR1 to master %d)", pid)
    while time.monotonic() < soft_deadline:
        _signal(pid, signal.SIGUSR1)
        if _wait_gone(pid, min(1.0, soft_deadline - time.monotonic())):
            return "soft"
    log.warning("haproxy still running %.1fs into its stop; stopping it hard", max(0.0, timeout - HARD_STOP_GRACE))
    _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, deadline - time.monotonic()):
        return "hard"
    log.warning("haproxy did not stop in %.1fs; killing it", timeout)
    kill_haproxy(pid)
    if not _wait_gone(pid, REAP_TIMEOUT):
        raise HAProxyError(f"haproxy master {pid} still there {REAP_TIMEOUT:.0f}s after SIGKILL")
    return "killed"


def kill_haproxy(pid: int) -> None:
    """SIGKILL master ``pid`` and everything in its process group (its workers), never our own group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _replace(path: Path, text: str) -> None:
    """Write the small file ``path`` atomically (a reader never sees half of it)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
