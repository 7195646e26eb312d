"""The registry record: what one running instance tells the mesh about itself.

Records are stored in Redis as JSON (readable with ``redis-cli``) under
``<namespace>:inst:<service>:<instance_id>`` and cached by every process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

UP = "up"
DRAINING = "draining"
STATES = (UP, DRAINING)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One running instance.

    ``endpoint`` is the ZeroMQ endpoint of its router (``tcp://host:port``);
    ``listeners`` maps a public listener name to the ``host:port`` a gateway
    accepts client connections on (what HAProxy routes to).
    """

    service: str
    instance_id: str
    endpoint: str
    host: str
    pid: int
    version: str = ""
    methods: tuple[str, ...] = ()
    idempotent: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()
    state: str = UP
    started_at: float = 0.0
    listeners: Mapping[str, str] = field(default_factory=dict)
    max_message_size: int = 0  # the largest request it accepts, in bytes; 0: not advertised

    @property
    def key(self) -> str:
        """The record's key below the namespace: ``<service>:<instance_id>``."""
        return f"{self.service}:{self.instance_id}"

    @property
    def is_up(self) -> bool:
        return self.state == UP

    def with_state(self, state: str) -> InstanceRecord:
        return replace(self, state=state)

    def to_json(self) -> str:
        return json.dumps(
            {
                "service": self.service,
                "instance_id": self.instance_id,
                "endpoint": self.endpoint,
                "host": self.host,
                "pid": self.pid,
                "version": self.version,
                "methods": list(self.methods),
                "idempotent": list(self.idempotent),
                "topics": list(self.topics),
                "state": self.state,
                "started_at": self.started_at,
                "listeners": dict(self.listeners),
                "max_message_size": self.max_message_size,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceRecord:
        """Parse a stored record; raise ``ValueError`` if it is malformed."""
        try:
            raw: Any = json.loads(text)
            for name in ("methods", "idempotent", "topics"):
                if not isinstance(raw.get(name, []), list):
                    raise TypeError(f"{name} must be a list")
            return cls(
                service=str(raw["service"]),
                instance_id=str(raw["instance_id"]),
                endpoint=str(raw["endpoint"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                version=str(raw.get("version", "")),
                methods=tuple(map(str, raw.get("methods", ()))),
                idempotent=tuple(map(str, raw.get("idempotent", ()))),
                topics=tuple(map(str, raw.get("topics", ()))),
                state=str(raw.get("state", UP)),
                started_at=float(raw.get("started_at", 0.0)),
                listeners={str(k): str(v) for k, v in dict(raw.get("listeners", {})).items()},
                max_message_size=int(raw.get("max_message_size", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed instance record: {exc}") from None
