"""Topic matching: which topics a subscription pattern covers.

A pattern is either a topic, matched exactly, or ``prefix.*``, which matches
every topic that starts with ``prefix.`` (``jobs.*`` matches ``jobs.new`` and
``jobs.new.block``, not ``jobs``). ``*`` alone is no pattern. One rule for
every reader: the handler table of a service, the registry's subscriber
lookup, and the gateway's per-connection subscriptions.
"""

from __future__ import annotations

from collections.abc import Iterable


def topic_matches(patterns: Iterable[str], topic: str) -> bool:
    """Whether ``topic`` matches one of ``patterns`` (exact, or ``prefix.*``)."""
    for pattern in patterns:
        if pattern == topic or (pattern.endswith(".*") and topic.startswith(pattern[:-1])):
            return True
    return False
