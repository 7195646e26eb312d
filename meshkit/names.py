"""The grammar of every name and address in a registry record (mirrored in ``docs/protocol.md``).

A registry record is input like any other: whatever a record says ends up in
Redis key names and ``SCAN MATCH`` patterns, in ZeroMQ endpoints, in HAProxy
runtime commands (where ``;`` separates commands) and in HAProxy's
configuration file. So every field that is a name or an address has a strict
grammar, checked by the ``validate_*`` functions below, both when a record is
written (:meth:`meshkit.record.InstanceRecord.validate`) and when one is read
(:meth:`meshkit.record.InstanceRecord.from_json`):

``SERVICE_NAME``   ``[a-z0-9_-]{1,64}``
``INSTANCE_ID``    ``[A-Za-z0-9_.-]{1,64}``
``LISTENER_NAME``  ``[A-Za-z0-9_-]{1,64}``
``HOST``           a DNS name of RFC 1123 labels (``[A-Za-z0-9]`` at both ends,
                   ``[A-Za-z0-9-]`` inside, 1..63 characters each, at most 253
                   in all), an IPv4 literal, or an IPv6 literal whose optional
                   scope id (after ``%``) is ``[A-Za-z0-9_.-]{1,64}``
``PORT``           a decimal integer 1..65535 (``[0-9]{1,5}``)
``ADDRESS``        ``HOST:PORT``; an IPv6 host may be written ``[v6]:PORT``
``ENDPOINT``       ``tcp://ADDRESS``
``CURVE_KEY``      a CurveZMQ public key in Z85: 40 characters of
                   ``[0-9a-zA-Z.:+=^!/*?&<>()[]{}@%$#-]``, or empty (no key)

No name can hold ``:`` (the separator of the key layout ``<ns>:inst:<service>:<id>``)
or ``*?[]`` (``SCAN MATCH`` wildcards); no host or address can hold a space,
``;``, ``#`` or a line break. Every ``validate_*`` function returns its
argument unchanged or raises ``ValueError`` whose message shows the offending
value clipped (:func:`meshkit.untrusted.clip`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from .untrusted import clip

__all__ = [
    "CURVE_KEY",
    "INSTANCE_ID",
    "LISTENER_NAME",
    "SCOPE_ID",
    "SERVICE_NAME",
    "is_ip_literal",
    "split_address",
    "validate_address",
    "validate_curve_key",
    "validate_endpoint",
    "validate_host",
    "validate_instance_id",
    "validate_listener_name",
    "validate_port",
    "validate_service_name",
]

SERVICE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
INSTANCE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LISTENER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SCOPE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_HOST = 253
ENDPOINT_SCHEME = "tcp://"
# Z85 (ZeroMQ RFC 32) encodes 32 key bytes as 40 characters of this alphabet.
CURVE_KEY = re.compile(r"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")


def _name(kind: str, pattern: re.Pattern[str], value: Any, rule: str) -> str:
    # fullmatch, never match + "$": "$" also matches before a trailing newline.
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ValueError(f"{kind} must be {rule}, got {clip(value)!r}")
    return value


def validate_service_name(value: Any) -> str:
    """``value`` if it is a ``SERVICE_NAME``; else ``ValueError``."""
    return _name("service name", SERVICE_NAME, value, "1-64 of [a-z0-9_-]")


def validate_instance_id(value: Any) -> str:
    """``value`` if it is an ``INSTANCE_ID``; else ``ValueError``."""
    return _name("instance id", INSTANCE_ID, value, "1-64 of [A-Za-z0-9_.-]")


def validate_listener_name(value: Any) -> str:
    """``value`` if it is a ``LISTENER_NAME``; else ``ValueError``."""
    return _name("listener name", LISTENER_NAME, value, "1-64 of [A-Za-z0-9_-]")


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 literal of the ``HOST`` grammar (scope id restricted).

    Stricter than :func:`ipaddress.ip_address`, which takes any text after
    ``%`` as an IPv6 scope id, spaces, ``;`` and line breaks included.
    """
    if not isinstance(host, str) or not host.isascii():
        return False
    address, percent, scope = host.partition("%")
    if percent and SCOPE_ID.fullmatch(scope) is None:
        return False
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not percent or parsed.version == 6


def _is_dns_name(host: str) -> bool:
    if not 0 < len(host) <= MAX_HOST:
        return False
    return all(_LABEL.fullmatch(label) is not None for label in host.split("."))


def validate_host(value: Any) -> str:
    """``value`` if it is a ``HOST`` (DNS name, IPv4 or IPv6 literal); else ``ValueError``."""
    if isinstance(value, str) and value.isascii() and (is_ip_literal(value) or _is_dns_name(value)):
        return value
    raise ValueError(f"host must be a DNS name or an IP address (IPv6 scope id of [A-Za-z0-9_.-]), "
                     f"got {clip(value)!r}")


def validate_port(value: Any) -> int:
    """``value`` (an int or its decimal text) as a port 1..65535; else ``ValueError``."""
    if isinstance(value, str) and _PORT.fullmatch(value) is not None:
        port = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        port = value
    else:
        raise ValueError(f"port must be a number 1-65535, got {clip(value)!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be a number 1-65535, got {clip(value)!r}")
    return port


def split_address(value: Any) -> tuple[str, int]:
    """An ``ADDRESS`` (``host:port`` or ``[v6]:port``) as ``(host, port)``; else ``ValueError``.

    The host comes back without brackets. An unbracketed host containing
    ``:`` must be an IPv6 literal (the port is after the last ``:``).
    """
    if not isinstance(value, str):
        raise ValueError(f"address must be host:port, got {clip(value)!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be host:port, got {clip(value)!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not host.isascii() or not (is_ip_literal(host) or _is_dns_name(host)):
        reason = "a DNS name or an IP address as host (IPv6 scope id of [A-Za-z0-9_.-])"
    elif (bracketed or ":" in host) and not (":" in host and is_ip_literal(host)):
        reason = "brackets around IPv6 literals only"
    elif _PORT.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
        reason = "a port 1-65535"
    else:
        return host, int(port_text)
    raise ValueError(f"address must be host:port with {reason}, got {clip(value)!r}")


def validate_address(value: Any) -> str:
    """``value`` if it is an ``ADDRESS``; else ``ValueError``."""
    split_address(value)
    return str(value)


def validate_endpoint(value: Any) -> str:
    """``value`` if it is an ``ENDPOINT`` (``tcp://host:port``); else ``ValueError``."""
    if not isinstance(value, str) or not value.startswith(ENDPOINT_SCHEME):
        raise ValueError(f"endpoint must be tcp://host:port, got {clip(value)!r}")
    try:
        split_address(value[len(ENDPOINT_SCHEME):])
    except ValueError as exc:
        raise ValueError(f"endpoint must be tcp://host:port: {exc}") from None
    return value


def validate_curve_key(value: Any) -> str:
    """A Z85 CurveZMQ public key (40 characters), or ``""`` for none."""
    if value == "":
        return ""
    if not isinstance(value, str) or CURVE_KEY.fullmatch(value) is None:
        raise ValueError(f"curve key must be 40 Z85 characters, got {clip(value)!r}")
    return value
