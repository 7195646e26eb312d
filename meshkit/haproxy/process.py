"""An HAProxy master process owned by the sync process.

HAProxy runs in master-worker mode: ``haproxy -W -S <master socket> -p <pid
file> -f <config>``. The master re-executes itself on ``reload`` and forks a
new worker that takes the listening sockets over from the old one, which
finishes its connections (up to ``hard-stop-after``). Frontends bound with
``fd@N`` use file descriptors this process passes down (``pass_fds``); the
master keeps them open across reloads, and since this process keeps them
too, a restarted master gets the very same listening sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from .errors import HAProxyError

log = logging.getLogger("meshkit.haproxy.process")

# Where Debian puts system programs: ``haproxy`` lands in /usr/sbin, often off
# a non-root user's PATH.
PROGRAM_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin")
HARD_STOP_GRACE = 2.0  # seconds of a stop budget kept for the hard stop (SIGTERM, then SIGKILL)
REAP_TIMEOUT = 1.0  # seconds a SIGKILLed master may take to be reaped


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


def find_haproxy() -> str:
    """Path of the ``haproxy`` program; raises :class:`~meshkit.errors.ConfigError` if not installed."""
    return find_program("haproxy")


class HAProxyProcess:
    """One HAProxy master started by this process.

    :meth:`start` launches it and returns at once (readiness is the runtime
    socket answering, which the caller waits for); :meth:`stop` stops it,
    softly if it can, within a time budget; :meth:`kill` does not ask. Once
    stopped or killed it is never started again.
    """

    def __init__(
        self,
        config_file: Path,
        master_socket: Path,
        pid_file: Path,
        haproxy: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.config_file = config_file
        self.master_socket = master_socket
        self.pid_file = pid_file
        self.haproxy = haproxy or find_haproxy()
        self.pass_fds = tuple(pass_fds)
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        """Whether the master is alive (reaping it if it died)."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def start(self) -> None:
        """Launch the master (after stopping one a previous owner left behind).

        Raises :class:`~meshkit.haproxy.errors.HAProxyError` after :meth:`stop`
        or :meth:`kill`: a round still finishing while the owner shuts down
        must not leave a fresh master behind.
        """
        if self._closed:
            raise HAProxyError("haproxy is being stopped; not starting it again")
        if self.running():
            return
        self._stop_leftover()
        with contextlib.suppress(FileNotFoundError):
            self.master_socket.unlink()
        argv = [
            self.haproxy, "-W",
            "-S", f"{self.master_socket},mode,600",
            "-p", str(self.pid_file),
            "-f", str(self.config_file),
        ]
        # Its own session: a Ctrl-C meant for us must not hard-stop HAProxy
        # behind our back; we stop it softly ourselves. Its process group (the
        # master's pid) also holds every worker, which is what kill() relies on.
        self._process = subprocess.Popen(argv, pass_fds=self.pass_fds, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.info("started haproxy master (pid %d): %s", self._process.pid, " ".join(argv))

    async def stop(self, timeout: float) -> None:
        """Stop the master and its workers within about ``timeout`` seconds, softly if they allow.

        Soft stop first (SIGUSR1: workers stop listening and finish their
        connections, then the master exits), repeated every second until
        :data:`HARD_STOP_GRACE` seconds are left; then a hard stop (SIGTERM to
        the master: connections are closed); at ``timeout``, SIGKILL to the
        master's whole process group. Returns once the master is reaped, at
        most ``timeout`` + :data:`REAP_TIMEOUT` seconds after the call. If the
        caller is cancelled meanwhile, everything is SIGKILLed before the
        cancellation goes on, so no exit path leaves HAProxy running.
        """
        self._closed = True
        if not self.running():
            return
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        soft_deadline = deadline - HARD_STOP_GRACE
        try:
            log.info("stopping haproxy softly (SIGUSR1 to master %d)", self._process.pid)
            while loop.time() < soft_deadline:
                # Repeated: a master re-executing itself (at start-up it re-executes
                # into "wait mode", and on every reload) drops a signal that arrives
                # meanwhile, and a second SIGUSR1 to a stopping master is harmless.
                self._signal(signal.SIGUSR1)
                if await self._wait(min(1.0, soft_deadline - loop.time())):
                    return
            log.warning("haproxy still running %.1fs into its stop; stopping it hard",
                        max(0.0, timeout - HARD_STOP_GRACE))
            self._signal(signal.SIGTERM)
            if await self._wait(deadline - loop.time()):
                return
            log.warning("haproxy did not stop in %.1fs; killing it", timeout)
        finally:
            # Also reached when cancelled or on any error: never leave it behind.
            self.kill()

    def kill(self) -> None:
        """SIGKILL the master and every worker (its process group), and reap the master.

        Waits at most :data:`REAP_TIMEOUT` seconds for the reaping.
        """
        self._closed = True
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        try:
            self._process.wait(REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("haproxy master %d not reaped %.0fs after SIGKILL", self._process.pid, REAP_TIMEOUT)

    def _signal(self, sig: int) -> None:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(sig)

    async def _wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.running():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _stop_leftover(self) -> None:
        """Soft-stop a master an earlier owner started with our config and never stopped (it was killed)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if os.fsencode(str(self.config_file)) in cmdline and b"-W" in cmdline:
            log.warning("stopping the haproxy master (pid %d) a previous sync left behind", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
