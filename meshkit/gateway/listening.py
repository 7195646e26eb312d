"""What the gateway's listeners (TCP: :mod:`.tcp`; HTTP and WebSocket: :mod:`.web`) share.

* :class:`Host`: what a listener needs of its gateway
  (:class:`~meshkit.gateway.service.Gateway` is the one implementation);
  listeners import this, never the gateway itself.
* :func:`bind_host` and :func:`candidate_ports`: where a listener binds (the
  kernel's choice of port, or ``port_min..port_max``).
"""

from __future__ import annotations

import random
from typing import Protocol

from ..config import Settings
from ..metrics import Metrics
from ..untrusted import LogThrottle
from .admission import Guard
from .dialect import Dialect
from .options import GatewayOptions
from .session import CallFunction, Session


class Host(Protocol):
    """What a listener needs of its gateway."""

    instance_id: str
    options: GatewayOptions
    metrics: Metrics
    guard: Guard
    dialect: Dialect
    conn_throttle: LogThrottle
    connections: dict[str, Session]

    @property
    def route(self) -> CallFunction: ...

    def new_id(self) -> str: ...

    def judge(self, conn: Session, kind: str) -> None: ...

    def judge_address(self, address: str | None, kind: str) -> None: ...

    def note_refusal(self, reason: str, message: str) -> None: ...

    def open_session(self, conn: Session) -> None: ...

    def close_session(self, conn: Session) -> None: ...


def bind_host(settings: Settings) -> str:
    """The address listeners bind (``""`` and ``"*"`` mean every IPv4 address)."""
    host = settings.bind_host
    return "0.0.0.0" if host in ("", "*") else host


def candidate_ports(settings: Settings) -> list[int]:
    """Ports to try in turn: ``[0]`` (the kernel picks), or up to 200 from ``port_min..port_max``."""
    low, high = settings.port_min, settings.port_max
    return random.sample(range(low, high + 1), min(200, high - low + 1)) if low else [0]
