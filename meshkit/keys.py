"""Every Redis key family meshkit writes, in one place.

Under the namespace ``ns`` (:attr:`Settings.namespace <meshkit.config.Settings.namespace>`,
which holds no ``:``)::

    ns:inst:<service>:<instance_id>   string: one InstanceRecord as JSON, with a TTL   (the registry)
    ns:changes                        pub/sub channel announcing every record change   (the registry)
    ns:conn:<conn_id>                 hash: the state of one client connection          (gateway state)
    ns:gwconns:<gateway_id>           set: the connection ids one gateway holds         (gateway state)

Who writes what and when is told by :mod:`meshkit.registry` and
:mod:`meshkit.gateway.state`; how records are read without trusting them,
by :mod:`meshkit.storage`. Names inside keys follow :mod:`meshkit.names`
(no ``:``, so a key splits back into its parts). ``SCAN MATCH`` patterns
escape the glob characters ``*?[]\\`` of every name they contain. The demo
services (``services/``) keep their own keys under ``ns:jobs:`` and the like.
"""

from __future__ import annotations

import re

__all__ = ["Keys", "glob_escape"]

_GLOB = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """``text`` with Redis glob characters escaped, for a ``SCAN MATCH`` pattern."""
    return _GLOB.sub(r"\\\1", text)


class Keys:
    """Key names for one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.instance_prefix = f"{namespace}:inst:"
        self.changes = f"{namespace}:changes"
        self.connection_prefix = f"{namespace}:conn:"
        self.gateway_prefix = f"{namespace}:gwconns:"
        self.resource_prefix = f"{namespace}:res:"  # + <name>:rate:<window>, :held, :until (meshkit.resources)

    def instance(self, key: str) -> str:
        """Redis key of the record whose :attr:`InstanceRecord.key` is ``key``."""
        return self.instance_prefix + key

    def match(self, service: str | None = None) -> str:
        """The ``SCAN MATCH`` pattern of every record (of ``service``), wildcards in names escaped."""
        return glob_escape(self.instance_prefix + (f"{service}:" if service else "")) + "*"

    def connection(self, conn_id: str) -> str:
        """The hash of client connection ``conn_id``'s state."""
        return self.connection_prefix + conn_id

    def gateway_connections(self, gateway_id: str) -> str:
        """The set of connection ids gateway ``gateway_id`` holds."""
        return self.gateway_prefix + gateway_id

    def gateways_match(self) -> str:
        """The ``SCAN MATCH`` pattern of every gateway's connection set."""
        return glob_escape(self.gateway_prefix) + "*"
