"""Which Redis a command typed by hand reads when it is not told: the local stack's, found by its run directory.

A command run without ``MESHKIT_REDIS_URL`` (a new shell, not the stack's
environment) would otherwise read the default ``redis://127.0.0.1:6379/0``
— whatever Redis that is, or none — and show an empty mesh.
:func:`choose_registry` looks, in this order, for

1. ``MESHKIT_REDIS_URL`` (or a ``redis_url`` in the settings file): used as given;
2. a stack running from the run directory (``--run-dir``, ``MESHKIT_RUN_DIR``
   or ``.run``): the Redis URL and namespace in its circusd's environment;
3. that stack's embedded Redis still answering at ``<run_dir>/redis.sock``
   (circusd gone, Redis not);
4. the Redis started by ``meshkit redis start``, answering in ``.redis/``;
5. the default URL,

and says which one it chose (:attr:`RegistryChoice.origin`) so that the tool
can tell its user. ``MESHKIT_NAMESPACE``, when set, always wins over the
stack's namespace.

The background Redis lives in :data:`LOCAL_REDIS_DIR`, beside the run
directory and never inside it: ``meshkit down`` stops every process whose
command line names the run directory, and ``meshkit up`` starts its own
Redis there; neither must touch it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from redis.exceptions import RedisError

from .config import DEFAULT_REDIS_URL, ENV_PREFIX, Settings
from .errors import ConfigError
from .redisconn import sync_client
from .storage import redacted_url
from .untrusted import clip

LOCAL_REDIS_DIR = ".redis"  # `meshkit redis start`'s directory, relative to the working directory
STACK_REDIS_SOCKET = "redis.sock"  # the stack's embedded Redis, in its run directory (circus.ini)
LOCAL_REDIS_SOCKET = "redis.sock"  # the background Redis, in LOCAL_REDIS_DIR


def unix_url(path: str | os.PathLike[str]) -> str:
    """The ``unix://`` URL of the Redis socket at ``path`` (made absolute)."""
    return f"unix://{os.path.abspath(path)}"


def local_redis_url(directory: str = LOCAL_REDIS_DIR) -> str:
    """Where ``meshkit redis start`` run with ``--dir directory`` listens."""
    return unix_url(os.path.join(directory, LOCAL_REDIS_SOCKET))


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis at ``url`` answers PING within ``timeout`` seconds (never raises)."""
    try:
        client = sync_client(url, timeout=timeout)
    except (ValueError, ConfigError):
        return False
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def stack_environment(run_dir: str) -> dict[str, str] | None:
    """The environment of the circusd running from ``run_dir``, or ``None`` if none runs there.

    ``meshkit up`` gives circusd every variable its processes use
    (``MESHKIT_REDIS_URL`` and ``MESHKIT_NAMESPACE`` among them), so this is
    the stack's own answer to "which Redis", whatever it was started with.
    """
    try:
        pid = int(Path(run_dir, "circusd.pid").read_text().strip())
        environ = psutil.Process(pid).environ()
    except (OSError, ValueError, psutil.Error):
        return None
    # A recycled pid is some other process: it would not name this run directory.
    if os.path.abspath(environ.get(ENV_PREFIX + "RUN_DIR", "")) != os.path.abspath(run_dir):
        return None
    return dict(environ)


@dataclass(frozen=True)
class RegistryChoice:
    """The settings a command should use, and where their Redis came from."""

    settings: Settings
    origin: str  # human words: "MESHKIT_REDIS_URL", "the stack running from /x/.run", ...
    explicit: bool  # True when the user named the Redis (nothing was guessed)

    def describe(self) -> str:
        """One line for the user: URL (password masked), namespace, origin."""
        return f"{redacted_url(self.settings.redis_url)}, namespace {clip(self.settings.namespace)} ({self.origin})"


def choose_registry(
    settings: Settings,
    env: Mapping[str, str],
    *,
    run_dir: str | None = None,
    local_dir: str = LOCAL_REDIS_DIR,
    answers: Callable[[str], bool] = redis_answers,
    stack_env: Callable[[str], Mapping[str, str] | None] = stack_environment,
) -> RegistryChoice:
    """Pick the Redis for a command run by hand (see the module doc for the order).

    ``answers`` and ``stack_env`` are the two probes of the outside world
    (PING a URL; read a running stack's environment), replaceable in tests.
    """
    if ENV_PREFIX + "REDIS_URL" in env or settings.redis_url != DEFAULT_REDIS_URL:
        return RegistryChoice(settings, "MESHKIT_REDIS_URL" if ENV_PREFIX + "REDIS_URL" in env
                              else "the settings file", explicit=True)
    run_dir = os.path.abspath(run_dir or settings.run_dir)
    keep_namespace = ENV_PREFIX + "NAMESPACE" in env
    stack = stack_env(run_dir)
    if stack is not None and stack.get(ENV_PREFIX + "REDIS_URL"):
        changes = {"redis_url": stack[ENV_PREFIX + "REDIS_URL"]}
        if not keep_namespace and stack.get(ENV_PREFIX + "NAMESPACE"):
            changes["namespace"] = stack[ENV_PREFIX + "NAMESPACE"]
        return RegistryChoice(settings.replace(**changes), f"the stack running from {run_dir}", explicit=False)
    embedded = unix_url(os.path.join(run_dir, STACK_REDIS_SOCKET))
    if answers(embedded):
        return RegistryChoice(settings.replace(redis_url=embedded),
                              f"the embedded Redis in {run_dir}", explicit=False)
    local = local_redis_url(local_dir)
    if answers(local):
        return RegistryChoice(settings.replace(redis_url=local),
                              f"the Redis of `meshkit redis start` in {os.path.abspath(local_dir)}",
                              explicit=False)
    return RegistryChoice(settings, "the default: MESHKIT_REDIS_URL is not set and no stack "
                          "or `meshkit redis start` Redis runs from this directory", explicit=False)


