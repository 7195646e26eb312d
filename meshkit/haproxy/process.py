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

log = logging.getLogger("meshkit.haproxy.process")

_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_haproxy() -> str:
    """Path of the ``haproxy`` program (Debian installs it in ``/usr/sbin``, often off a user's PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = os.path.join(directory, "haproxy")
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("haproxy is not installed (Debian: apt-get install haproxy)")


class HAProxyProcess:
    """One HAProxy master started by this process.

    :meth:`start` launches it and returns at once (readiness is the runtime
    socket answering, which the caller waits for); :meth:`stop` stops it
    softly; :meth:`kill` does not ask.
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
        """Launch the master (after stopping one a previous owner left behind)."""
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
        # behind our back; we stop it softly ourselves.
        self._process = subprocess.Popen(argv, pass_fds=self.pass_fds, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.info("started haproxy master (pid %d): %s", self._process.pid, " ".join(argv))

    async def stop(self, timeout: float) -> None:
        """Soft stop (SIGUSR1): workers finish their connections, the master exits.

        If it is still running after ``timeout`` seconds it gets SIGTERM (hard
        stop), then SIGKILL.
        """
        if not self.running():
            return
        assert self._process is not None
        log.info("stopping haproxy softly (SIGUSR1 to master %d)", self._process.pid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            # Repeated: a master re-executing itself (at start-up it re-executes
            # into "wait mode", and on every reload) drops a signal that arrives
            # meanwhile, and a second SIGUSR1 to a stopping master is harmless.
            if not self.running():
                return
            self._process.send_signal(signal.SIGUSR1)
            if await self._wait(min(1.0, deadline - loop.time())):
                return
        log.warning("haproxy still running after %.0fs; stopping it hard", timeout)
        self._process.send_signal(signal.SIGTERM)
        if not await self._wait(5.0):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the master and reap it (its workers notice and exit)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

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
