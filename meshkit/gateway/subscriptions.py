"""What a client may subscribe to, and how it says so.

A gateway forwards the topics its configuration allows (``topics``, as
patterns); a client subscribes to topics or ``prefix.*`` patterns that lie
inside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..topics import topic_matches
from ..untrusted import clip
from . import jsonrpc
from .jsonrpc import RpcError


def covered(allowed: Iterable[str], wanted: str) -> bool:
    """Whether topic or ``prefix.*`` pattern ``wanted`` lies inside the ``allowed`` patterns."""
    if not wanted.endswith(".*"):
        return topic_matches(allowed, wanted)
    prefix = wanted[:-1]
    return any(p == wanted or (p.endswith(".*") and prefix.startswith(p[:-1])) for p in allowed)


def topics_param(params: list[Any] | dict[str, Any] | None) -> list[str]:
    """Topics from no params, ``["a", "b"]``, ``[["a", "b"]]`` or ``{"topics": [...]}``.

    Anything else (``{"topics": 5}``, ``{"other": 1}``, ``[1]``, ...) raises
    :class:`RpcError` ``invalid_params``.
    """
    items: Any = params
    if isinstance(params, dict):
        unknown = sorted(set(params) - {"topics"})
        if unknown:
            raise RpcError(jsonrpc.INVALID_PARAMS,
                           f"unknown params {unknown}; the only one is \"topics\"")
        items = params.get("topics", [])
    if items is None:
        items = []
    if isinstance(items, list) and len(items) == 1 and isinstance(items[0], list):
        items = items[0]
    if not isinstance(items, list) or not all(isinstance(t, str) and t for t in items):
        raise RpcError(jsonrpc.INVALID_PARAMS, "topics must be a list of non-empty strings")
    return list(items)


def subscribe(current: set[str], topics: list[str], allowed: Iterable[str], limit: int) -> list[str]:
    """Add ``topics`` to the ``current`` subscriptions (in place); return them all, sorted.

    All or nothing: a topic outside the ``allowed`` patterns, no topic at all,
    or more than ``limit`` subscriptions in all raise :class:`RpcError`
    ``invalid_params`` and add none.
    """
    allowed = list(allowed)
    refused = [t for t in topics if not covered(allowed, t)]
    if refused:
        shown = ", ".join(clip(t, 60) for t in refused[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise RpcError(jsonrpc.INVALID_PARAMS, f"topics not forwarded by this gateway: {shown}{more}",
                       {"forwarded": allowed})
    if not topics:
        raise RpcError(jsonrpc.INVALID_PARAMS, "mesh.subscribe needs at least one topic",
                       {"forwarded": allowed})
    # Every push is matched against every subscription of every connection:
    # one client must not make that cost unbounded.
    if len(current | set(topics)) > limit:
        raise RpcError(jsonrpc.INVALID_PARAMS,
                       f"at most {limit} subscriptions per connection "
                       f"(this one has {len(current)}); none added",
                       {"max_subscriptions": limit})
    current.update(topics)
    return sorted(current)
