"""Real processes for tests: a private ``redis-server`` and service subprocesses.

Nothing here picks a port: Redis listens on a unix socket in a temporary
directory, services bind port 0 and advertise what they got. Readiness is a
positive signal (Redis answers PING; the service's record is in the registry)
waited for with a deadline.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import redis

from ..config import TABLE_FIELDS, Settings
from ..errors import ConfigError
from ..programs import find_program as find_system_program
from ..record import InstanceRecord
from ..redisconn import sync_client
from ..registry import read_records


class MissingProgramError(RuntimeError):
    """A system program the tests need is not installed (run ``make test`` to install it)."""


def find_program(name: str) -> str:
    """Full path of a system program, looking in the sbin directories too.

    Debian installs ``haproxy`` and ``redis-server`` under ``/usr/sbin`` and
    ``/usr/bin``; a non-root PATH may lack the former. The search is meshkit's
    own (:func:`meshkit.programs.find_program`). A missing program
    raises :class:`MissingProgramError`: an error, never a skip.
    """
    try:
        return find_system_program(name)
    except ConfigError:
        raise MissingProgramError(
            f"{name} is not installed; `make test` installs it (apt-get install {name})") from None


class ProcessExitedError(RuntimeError):
    """A process a test waits for exited: waiting longer cannot help."""


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is truthy; raise ``TimeoutError`` naming ``what``.

    Exceptions from ``predicate`` count as "not yet" (a server still starting
    refuses connections), except :class:`ProcessExitedError`, which ends the
    wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except ProcessExitedError:
            raise
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private ``redis-server`` on a unix socket, with nothing kept on disk.

    :meth:`kill` and :meth:`start` may be called repeatedly; the socket path
    (and so :attr:`url`) stays the same, which is how tests simulate an outage.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="meshkit-redis-")
        self.socket_path = os.path.join(self.directory, "redis.sock")
        self.url = f"unix://{self.socket_path}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen(
            [
                find_program("redis-server"),
                "--port", "0",
                "--unixsocket", self.socket_path,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--loglevel", "warning",
                "--maxclients", "4000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout, "redis-server to answer PING")
        return self

    def ping(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                raise ProcessExitedError(f"redis-server exited with {self.process.returncode}")
            return False
        client = sync_client(self.url, timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def client(self) -> redis.Redis:
        """A synchronous client for inspecting the server."""
        return sync_client(self.url, timeout=2.0)

    def kill(self) -> None:
        """SIGKILL the server (an outage; all data is lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings_env(settings: Settings) -> dict[str, str]:
    """``MESHKIT_*`` variables that give a child process the same settings.

    Every field that holds a value (tables do not fit in a variable; pass a
    config file through ``MESHKIT_CONFIG`` for ``service_overrides``), over
    the ``MESHKIT_*`` variables the settings were loaded with.
    """
    env = dict(settings.environment)
    env.update({f"MESHKIT_{f.name.upper()}": str(getattr(settings, f.name))
                for f in dataclasses.fields(settings) if f.name not in TABLE_FIELDS})
    return env


class ServiceProcess:
    """A service in a child process (``python -m meshkit run TARGET``).

    :meth:`start` returns once the instance's record is in the registry with
    state ``up``. Its log goes to :attr:`log_path`.
    """

    def __init__(
        self,
        target: str,
        settings: Settings,
        env: Mapping[str, str] | None = None,
        log_dir: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.target = target
        self.settings = settings
        self.extra_env = dict(env or {})
        self.args = args
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="meshkit-svc-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ""
        self.record: InstanceRecord | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 15.0) -> ServiceProcess:
        """Launch the process and return once it is registered (see :meth:`wait_registered`)."""
        self.spawn()
        return self.wait_registered(timeout)

    def spawn(self) -> None:
        """Launch the process without waiting for it (start several, then wait for each)."""
        env = dict(os.environ)
        env.update(settings_env(self.settings))
        env.update(self.extra_env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = os.path.join(self.log_dir, f"{self.target.replace(':', '.')}-{time.time_ns()}.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshkit", "run", self.target, *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_registered(self, timeout: float = 15.0) -> ServiceProcess:
        """Wait until the record of this process is in the registry with state ``up``.

        Raises ``TimeoutError`` (after killing the process) if it does not
        register within ``timeout`` seconds, :class:`ProcessExitedError` if it exits.
        """

        def registered() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ProcessExitedError(
                    f"{self.target} exited with {self.process.returncode}: {self.tail()}")
            for rec in read_records(self.settings):
                if rec.pid == self.process.pid and rec.is_up:
                    self.record = rec
                    return True
            return False

        try:
            wait_until(registered, timeout, f"{self.target} to register", interval=0.05)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"{self.target} did not register within {timeout}s: {self.tail()}") from None
        return self

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        return self.signal_and_wait(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL (no clean-up at all)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def signal_and_wait(self, sig: int, timeout: float) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def tcp_listener(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a kernel-chosen port (read it with ``getsockname``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock
