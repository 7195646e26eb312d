"""``meshkit redis start|stop|status``: a private Redis for this directory, in the background.

It is the Redis the stack embeds (``circus.ini``'s ``[watcher:redis]``: no
TCP port, a unix socket only its owner may open, nothing saved to disk),
run alone so that services can be tried without the stack and without
installing or configuring a Redis. It lives in ``.redis/`` (``--dir``):
``redis.sock``, ``redis.pid``, ``redis.log``.

``start``   starts it unless it already answers, waits until it answers
            PING, and prints ``export MESHKIT_REDIS_URL=unix://...`` on stdout
            (so ``eval "$(meshkit redis start)"`` sets it); what it did goes to
            stderr. Starting it again reports that it is already running and
            prints the same line.
``stop``    shuts it down (``SHUTDOWN NOSAVE``) and waits until it is gone.
``status``  says whether it runs; exit status 0 if it does, 1 if not.

Commands typed in this directory without ``MESHKIT_REDIS_URL`` find it by
themselves (:mod:`meshkit.rundir`); the variable is for everything else
(a Python script, another directory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..errors import ConfigError, MeshError
from ..programs import find_program
from ..redisconn import sync_client
from ..rundir import LOCAL_REDIS_DIR, LOCAL_REDIS_SOCKET, redis_answers, unix_url

# The longest path a unix socket address holds on Linux (sun_path is 108 bytes, NUL included).
MAX_SOCKET_PATH = 107


class LocalRedisError(MeshError):
    """The background Redis could not be started or stopped."""


class LocalRedis:
    """The background Redis of one directory (made absolute)."""

    def __init__(self, directory: str = LOCAL_REDIS_DIR) -> None:
        self.directory = os.path.abspath(directory)
        self.socket = os.path.join(self.directory, LOCAL_REDIS_SOCKET)
        self.pidfile = os.path.join(self.directory, "redis.pid")
        self.logfile = os.path.join(self.directory, "redis.log")
        self.url = unix_url(self.socket)

    def answers(self) -> bool:
        return redis_answers(self.url)

    def pid(self) -> int | None:
        """The pid in the pid file, if that process is a live ``redis-server``."""
        try:
            pid = int(Path(self.pidfile).read_text().strip())
            alive = psutil.Process(pid).name().startswith("redis-server")
        except (OSError, ValueError, psutil.Error):
            return None
        return pid if alive else None

    def start(self, timeout: float = 10.0) -> bool:
        """Start it and wait until it answers; False if it was already running.

        Raises :class:`~meshkit.errors.ConfigError` if ``redis-server`` is not
        installed or the socket path is too long, :class:`LocalRedisError` if
        it does not come up within ``timeout`` s (with the end of its log).
        """
        if self.answers():
            return False
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise ConfigError(f"socket path {self.socket} is longer than {MAX_SOCKET_PATH} bytes; "
                              "pass a shorter --dir")
        try:
            program = find_program("redis-server")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; `make sysdeps` installs it") from None
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with open(self.logfile, "ab") as log:
            # A session of its own: Ctrl-C in this terminal must not reach it,
            # and it outlives this command by design.
            proc = subprocess.Popen(
                [program, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", self.directory,
                 "--pidfile", self.pidfile, "--logfile", self.logfile],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.directory,
                start_new_session=True, env=_own_environment())
        deadline = time.monotonic() + timeout
        while not self.answers():
            if proc.poll() is not None:
                raise LocalRedisError(f"redis-server exited with status {proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise LocalRedisError(f"redis-server did not answer within {timeout:g}s: {self._log_tail()}")
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut it down and wait until it is gone; False if it was not running."""
        pid = self.pid()
        if not self.answers():
            if pid is None:
                return False
            os.kill(pid, signal.SIGTERM)  # running but not answering: hung, or still starting
        else:
            client = sync_client(self.url, timeout=timeout)
            try:
                client.shutdown(nosave=True)
            except RedisConnectionError:
                pass  # the expected end of a successful SHUTDOWN
            except RedisError as exc:
                raise LocalRedisError(f"redis-server at {self.url} refused to shut down: {exc}") from None
            finally:
                client.close()
        deadline = time.monotonic() + timeout
        while self.answers() or (pid is not None and _alive(pid)):
            if time.monotonic() > deadline:
                if pid is None:
                    raise LocalRedisError(f"redis-server at {self.url} still answers after {timeout:g}s")
                os.kill(pid, signal.SIGKILL)
                deadline += 5.0
            time.sleep(0.05)
        return True

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = Path(self.logfile).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text) or "(empty log)"


def _own_environment() -> dict[str, str]:
    """This environment without ``MESHKIT_*``: ``meshkit down`` stops processes whose
    ``MESHKIT_RUN_DIR`` names its run directory, and this Redis is not the stack's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHKIT_")}


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def export_line(url: str) -> str:
    """The shell line that points meshkit at ``url``."""
    return f"export MESHKIT_REDIS_URL={shlex.quote(url)}"


def add_commands(sub: Any) -> None:
    """Register ``meshkit redis start|stop|status``."""
    parser = sub.add_parser("redis", help="a private Redis for this directory, in the background",
                            description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    actions = parser.add_subparsers(metavar="ACTION")
    for name, func, text in (("start", cmd_start, "start it (if needed) and print the export line"),
                             ("stop", cmd_stop, "stop it"),
                             ("status", cmd_status, "say whether it runs (exit 1 if not)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--dir", default=LOCAL_REDIS_DIR, help=f"its directory (default: {LOCAL_REDIS_DIR})")
        action.set_defaults(func=func)


def cmd_start(args: argparse.Namespace) -> int:
    local = LocalRedis(args.dir)
    if local.start():
        print(f"started redis-server (pid {local.pid() or '?'}) in {local.directory}; "
              "stop it with: meshkit redis stop", file=sys.stderr)
    else:
        print(f"already running at {local.url} (pid {local.pid() or '?'})", file=sys.stderr)
    print(export_line(local.url), flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    local = LocalRedis(args.dir)
    print(f"stopped the Redis in {local.directory}" if local.stop()
          else f"no Redis running in {local.directory}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    local = LocalRedis(args.dir)
    if local.answers():
        print(f"running at {local.url} (pid {local.pid() or '?'})")
        return 0
    print(f"not running (it would listen at {local.url}; start it with: meshkit redis start)")
    return 1
