"""The registry record: what one running instance tells the mesh about itself.

Records are stored in Redis as JSON (readable with ``redis-cli``) under
``<namespace>:inst:<service>:<instance_id>`` and cached by every process.

A record is input like any other (anyone who can write to Redis can write
one), so it is checked at both ends against the grammar of
:mod:`meshkit.names` and the bounds below (see "Registry field grammar" in
``docs/protocol.md``): :meth:`InstanceRecord.validate` refuses to write a bad
one (``ConfigError``), :meth:`InstanceRecord.from_json` refuses to read one
(``ValueError``), and neither ever echoes more than a clipped value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import names
from .codes import InstanceState
from .errors import ConfigError
from .untrusted import clip

UP = InstanceState.UP
DRAINING = InstanceState.DRAINING
STATES = (UP, DRAINING)

MAX_RECORD_BYTES = 64 * 1024  # the whole JSON text; 1,000 methods of 40 characters take 45 KiB
MAX_ITEMS = 1000  # methods, idempotent methods or topics in one record
MAX_LISTENERS = 64
MAX_PID = 2**31 - 1
MAX_MESSAGE_SIZE = 2**40  # what a record may advertise as its largest request
# A method or topic: 1-200 characters, no whitespace or control characters.
TOKEN = re.compile(r"[^\x00-\x20\x7f-\x9f]{1,200}")
# A method's one-line signature: 0-300 characters, no control characters.
SIGNATURE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{0,300}")
# A version: 0-64 characters, no control characters.
VERSION = re.compile(r"[^\x00-\x1f\x7f-\x9f]{0,64}")


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
    curve_key: str = ""  # its router's CurveZMQ public key (Z85); "": it serves without CURVE
    features: tuple[str, ...] = ()  # optional protocol features it speaks (``wire.FEATURES``: "cancel")
    streams: tuple[str, ...] = ()  # methods that stream their answer (async generators, meshkit.streams)
    # method -> its signature in one line ("(n: int, s: str) -> str", meshkit.signature), when it fits
    signatures: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The record's key below the namespace: ``<service>:<instance_id>``."""
        return f"{self.service}:{self.instance_id}"

    @property
    def is_up(self) -> bool:
        return self.state == UP

    def with_state(self, state: str) -> InstanceRecord:
        return replace(self, state=state)

    def with_signatures(self, signatures: Mapping[str, str]) -> InstanceRecord:
        """This record carrying ``signatures`` if it still fits :data:`MAX_RECORD_BYTES`, else as it is.

        Signatures are a convenience for tools (``meshkit ls --json``, ``meshkit
        call``); a service with very many methods goes without them rather than
        without a record.
        """
        record = replace(self, signatures=dict(signatures))
        return record if len(record.to_json().encode()) <= MAX_RECORD_BYTES else self

    def to_json(self) -> str:
        fields: dict[str, Any] = {
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
        }
        # Optional fields are written only when set: a record without them reads as before.
        if self.features:
            fields["features"] = list(self.features)
        if self.streams:
            fields["streams"] = list(self.streams)
        if self.signatures:
            fields["signatures"] = dict(self.signatures)
        if self.curve_key:
            fields["curve_key"] = self.curve_key
        return json.dumps(fields, separators=(",", ":"))


    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceRecord:
        """Parse a stored record; raise ``ValueError`` if it is malformed or breaks the grammar.

        Texts over :data:`MAX_RECORD_BYTES` are refused before they are parsed,
        and any nesting depth is survived (a ``RecursionError`` is a malformed
        record, not a crash).
        """
        if len(text) > MAX_RECORD_BYTES:
            raise ValueError(f"malformed instance record: {len(text)} bytes, more than {MAX_RECORD_BYTES}")
        try:
            raw: Any = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"malformed instance record: not JSON ({clip(str(exc))})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> InstanceRecord:
        """Build a record from decoded JSON; raise ``ValueError`` as :meth:`from_json` does."""
        try:
            for name in ("methods", "idempotent", "topics", "features", "streams"):
                if not isinstance(raw.get(name, []), list):
                    raise TypeError(f"{name} must be a list")
            listeners = raw.get("listeners", {})
            if not isinstance(listeners, dict):
                raise TypeError("listeners must be an object")
            signatures = raw.get("signatures", {})
            if not isinstance(signatures, dict) or not all(isinstance(v, str) for v in signatures.values()):
                raise TypeError("signatures must be an object of strings")
            record = cls(
                service=str(raw["service"]),
                instance_id=str(raw["instance_id"]),
                endpoint=str(raw["endpoint"]),
                host=str(raw["host"]),
                pid=_integer(raw["pid"]),
                version=str(raw.get("version", "")),
                methods=_strings(raw.get("methods", ())),
                idempotent=_strings(raw.get("idempotent", ())),
                topics=_strings(raw.get("topics", ())),
                state=str(raw.get("state", UP)),
                started_at=float(raw.get("started_at", 0.0)),
                listeners={str(k): str(v) for k, v in listeners.items()},
                max_message_size=_integer(raw.get("max_message_size", 0)),
                curve_key=str(raw.get("curve_key", "")),
                features=_strings(raw.get("features", ())),
                streams=_strings(raw.get("streams", ())),
                signatures={str(k): v for k, v in signatures.items()},
            )
            record.check()
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError, OverflowError) as exc:
            # 300: the messages of meshkit.names quote a clipped value of their own.
            raise ValueError(f"malformed instance record: {clip(str(exc), 300)}") from None
        return record

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field outside the grammar or the bounds."""
        names.validate_service_name(self.service)
        names.validate_instance_id(self.instance_id)
        names.validate_endpoint(self.endpoint)
        names.validate_host(self.host)
        if not 0 <= self.pid <= MAX_PID:
            raise ValueError(f"pid out of range: {clip(self.pid)}")
        if VERSION.fullmatch(self.version) is None:
            raise ValueError(f"version must be 0-64 printable characters, got {clip(self.version)!r}")
        for field_name in ("methods", "idempotent", "topics", "features", "streams"):
            items = getattr(self, field_name)
            if len(items) > MAX_ITEMS:
                raise ValueError(f"{field_name}: {len(items)} entries, more than {MAX_ITEMS}")
            for item in items:
                if TOKEN.fullmatch(item) is None:
                    raise ValueError(f"{field_name} entries must be 1-200 characters without whitespace, "
                                     f"got {clip(item)!r}")
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {clip(self.state)!r}")
        if not math.isfinite(self.started_at) or self.started_at < 0:
            raise ValueError(f"started_at must be a finite time, got {clip(self.started_at)}")
        if len(self.listeners) > MAX_LISTENERS:
            raise ValueError(f"listeners: {len(self.listeners)} entries, more than {MAX_LISTENERS}")
        for name, address in self.listeners.items():
            names.validate_listener_name(name)
            try:
                names.validate_address(address)
            except ValueError as exc:
                raise ValueError(f"listener {clip(name)!r}: {exc}") from None
        if len(self.signatures) > MAX_ITEMS:
            raise ValueError(f"signatures: {len(self.signatures)} entries, more than {MAX_ITEMS}")
        for method, text in self.signatures.items():
            if TOKEN.fullmatch(method) is None or SIGNATURE.fullmatch(text) is None:
                raise ValueError(f"signatures: {clip(method)!r} must be a method name with 0-300 printable "
                                 f"characters, got {clip(text)!r}")
        if not 0 <= self.max_message_size <= MAX_MESSAGE_SIZE:
            raise ValueError(f"max_message_size out of range: {clip(self.max_message_size)}")
        names.validate_curve_key(self.curve_key)

    def validate(self) -> InstanceRecord:
        """Return the record if it may be written; raise :class:`ConfigError` saying why not.

        Called by every writer (:class:`~meshkit.registration.Registration`),
        so a bad setting such as an ``advertise_host`` with a space or ``;`` in
        it stops the process at start-up instead of reaching other processes.
        """
        try:
            self.check()
            size = len(self.to_json().encode())
        except ValueError as exc:
            raise ConfigError(f"invalid registry record {clip(self.key)}: {exc}") from None
        if size > MAX_RECORD_BYTES:
            raise ConfigError(f"registry record {clip(self.key)} is {size} bytes, more than {MAX_RECORD_BYTES}")
        return self


def _integer(value: Any) -> int:
    # JSON true/false are ints to Python; 1.5 is not a pid.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"not an integer: {clip(value)}")
    return int(value)


def _strings(values: Any) -> tuple[str, ...]:
    if len(values) > MAX_ITEMS:
        raise ValueError(f"{len(values)} entries, more than {MAX_ITEMS}")
    return tuple(map(str, values))
