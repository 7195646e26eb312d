"""Whether what a command is about to read can be reached: the registry, and each instance.

:func:`check_registry` asks Redis for a PING before a command reads the
registry, so an unreachable Redis (down, wrong address, wrong password) is
reported as such — naming the URL, password masked — instead of looking
like an empty registry (``no_instance``, ``{"delivered": 0}``).

:func:`probe_instances` connects to each instance's router as a caller
would and reports those whose connection is refused, lost, or not
completed within the mesh's own ``dead_after``, so ``meshkit ls`` does not
show a killed instance as ``up`` for the rest of its record's TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import zmq
from redis.exceptions import RedisError
from zmq.utils.monitor import recv_monitor_message

from .. import curve
from ..config import Settings
from ..errors import ConfigError, RegistryUnreachableError
from ..redisconn import sync_client
from ..storage import redacted_url
from ..untrusted import clip

REFUSED = "connection refused"
LOST = "connection lost"

_PROBE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CLOSED | zmq.EVENT_CONNECT_RETRIED
                 | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                 | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


def check_registry(settings: Settings, timeout: float = 2.0) -> None:
    """Raise :class:`RegistryUnreachableError` unless the registry's Redis answers PING within ``timeout`` s."""
    try:
        client = sync_client(settings.redis_url, timeout=timeout)
    except (ValueError, ConfigError) as exc:
        raise unreachable(settings, exc) from None
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        raise unreachable(settings, exc) from None
    finally:
        client.close()


def unreachable(settings: Settings, exc: BaseException) -> RegistryUnreachableError:
    """The error for a registry read that failed with ``exc``."""
    return RegistryUnreachableError(redacted_url(settings.redis_url), clip(str(exc) or type(exc).__name__, 200))


# Sockets probed at once: two per endpoint (the DEALER and its monitor), well
# under a default limit of 1,024 open files.
PROBE_BATCH = 128


def probe_instances(endpoints: Iterable[str], timeout: float, settings: Settings | None = None,
                    curve_keys: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """For each endpoint, ``None`` if a ZeroMQ handshake with it completed within ``timeout`` s, else why not.

    Endpoints are tried :data:`PROBE_BATCH` at a time, so a listing of up to
    that many instances takes at most ``timeout``. A refused connection (the
    process is gone; its port is closed) is reported as soon as the kernel
    says so; a host or process that does not answer (stopped, firewalled)
    when ``timeout`` runs out. With CurveZMQ on in ``settings``, each endpoint
    is probed as a CURVE client of its key in ``curve_keys`` (meshkit.curve).
    """
    unique = list(dict.fromkeys(endpoints))
    verdicts: dict[str, str | None] = {}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for start in range(0, len(unique), PROBE_BATCH):
            verdicts.update(_probe_batch(ctx, unique[start:start + PROBE_BATCH], timeout, settings,
                                         curve_keys or {}))
    finally:
        ctx.term()
    return verdicts


def _probe_batch(ctx: zmq.Context[zmq.Socket[bytes]], endpoints: list[str], timeout: float,
                 settings: Settings | None, curve_keys: Mapping[str, str]) -> dict[str, str | None]:
    sockets: list[zmq.Socket[bytes]] = []
    waiting: dict[zmq.Socket[bytes], str] = {}
    verdicts: dict[str, str | None] = {}
    poller = zmq.Poller()
    try:
        for endpoint in endpoints:
            sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sockets.append(sock)
            monitor = sock.get_monitor_socket(_PROBE_EVENTS)
            sockets.append(monitor)
            try:
                if settings is not None:  # CurveZMQ when on (meshkit.curve)
                    curve.apply_client(sock, curve_keys.get(endpoint, ""), settings)
                sock.connect(endpoint)
            except ConfigError as exc:
                verdicts[endpoint] = clip(str(exc), 200)
                continue
            except zmq.ZMQError as exc:
                verdicts[endpoint] = f"bad endpoint ({exc})"
                continue
            waiting[monitor] = endpoint
            poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while waiting and (left := deadline - time.monotonic()) > 0:
            for monitor, _ in poller.poll(max(1, int(left * 1000))):
                decided, problem = verdict_of(recv_monitor_message(monitor)["event"])
                if decided and monitor in waiting:
                    verdicts[waiting.pop(monitor)] = problem
                    poller.unregister(monitor)
        for endpoint in waiting.values():
            verdicts[endpoint] = f"no answer within {timeout:g}s"
        return verdicts
    finally:
        for sock in sockets:
            sock.close(linger=0)


def verdict_of(event: int) -> tuple[bool, str | None]:
    """``(decided, problem)`` for a monitor event of a connecting socket; ``problem`` is None if reached."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return True, None
    if event in (zmq.EVENT_CLOSED, zmq.EVENT_CONNECT_RETRIED):
        return True, REFUSED
    if event == zmq.EVENT_DISCONNECTED:
        return True, LOST
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return True, "not a meshkit router (handshake failed)"
    return False, None  # connecting, connected: the handshake is still to come
