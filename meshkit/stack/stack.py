"""``Stack``: one run directory of the Circus stack, its paths, and the environment ``circus.ini`` expects.

A :class:`Stack` names where a stack's files live (``circus.sock``,
``circusd.pid``, the control lock) and holds the :class:`CircusControl` that
talks to its circusd; :func:`stack_env` builds the variables ``circus.ini``
reads. Both are used by the lifecycle (:mod:`.lifecycle`) and by the
``meshkit up|down|status|...`` commands (:mod:`meshkit.cli.stack`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

from ..config import Settings
from ..rundir import stack_environment
from .control import CircusControl, StackError
from .processes import STACK_MARKER

DEFAULT_STRATUM_PORT = "3333"


class Stack:
    """Paths and the control client of one run directory."""

    def __init__(self, settings: Settings, run_dir: str | None = None) -> None:
        self.settings = settings
        self.run_dir = os.path.abspath(run_dir or settings.run_dir)
        self.endpoint = f"ipc://{self.run_dir}/circus.sock"
        self.pubsub_endpoint = f"ipc://{self.run_dir}/circus-pubsub.sock"  # as circus.ini names it
        self.pidfile = os.path.join(self.run_dir, "circusd.pid")
        self.control = CircusControl(self.endpoint, os.path.join(self.run_dir, "control.lock"))

    def circusd_pid(self) -> int | None:
        try:
            pid = int(Path(self.pidfile).read_text().strip())
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return None
        except (OSError, ValueError, psutil.Error):
            return None
        return pid

    def require_running(self) -> int:
        """circusd's pid; :class:`StackError` saying no stack runs here if there is none."""
        pid = self.circusd_pid()
        if pid is None:
            raise StackError(f"no stack is running from {self.run_dir} (start one with `meshkit up`)")
        return pid

    def settings_of_stack(self) -> Settings:
        """The settings the stack's processes run with (Redis URL, namespace, ...).

        Read from circusd's environment when this user may, so that
        ``meshkit status`` and ``meshkit restart`` look at the stack's own
        registry even when the shell does not set ``MESHKIT_REDIS_URL``.
        """
        env = stack_environment(self.run_dir)
        return Settings.load(env=env) if env is not None else self.settings

    def watcher_log(self, watcher: str) -> str | None:
        """The file a watcher's output goes to, as circusd says (stderr's stream first); None if none."""
        try:
            reply = self.control.call("get", name=watcher, keys=["stderr_stream_conf", "stdout_stream_conf"])
        except StackError:
            return None
        options = reply.get("options", {})
        for key in ("stderr_stream_conf", "stdout_stream_conf"):
            conf = options.get(key) if isinstance(options, dict) else None
            if isinstance(conf, dict) and isinstance(conf.get("filename"), str):
                return str(conf["filename"])
        return None


def stack_env(settings: Settings, run_dir: str, home: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment ``circus.ini`` expects (see its header)."""
    env = dict(environ)
    env["MESHKIT_RUN_DIR"] = run_dir
    env[STACK_MARKER] = run_dir  # marks every process of this stack (see processes.py)
    env["MESHKIT_HOME"] = home
    env["MESHKIT_PYTHON"] = sys.executable
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", ""),
                                   "/usr/local/sbin", "/usr/sbin", "/sbin"])
    if environ.get("MESHKIT_REDIS_URL"):
        env["MESHKIT_EMBEDDED_REDIS"] = "false"
    else:
        env["MESHKIT_EMBEDDED_REDIS"] = "true"
        env["MESHKIT_REDIS_URL"] = f"unix://{run_dir}/redis.sock"
    config = os.path.join(home, "configs", "meshkit.toml")
    if os.path.exists(config):
        env.setdefault("MESHKIT_CONFIG", config)
    env.setdefault("MESHKIT_NAMESPACE", settings.namespace)
    # Loopback unless told otherwise: a demo should not listen on every interface.
    env.setdefault("MESHKIT_STRATUM_HOST", "127.0.0.1")
    env.setdefault("MESHKIT_STRATUM_PORT", DEFAULT_STRATUM_PORT)
    host, _, port = settings.statsd_address.rpartition(":")
    env.setdefault("MESHKIT_STATSD_HOST", host or "127.0.0.1")
    env.setdefault("MESHKIT_STATSD_PORT", port or "8125")
    env.setdefault("MESHKIT_LOG_FORMAT", settings.log_format)
    return env
