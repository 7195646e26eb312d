"""The gateway's built-in methods (``mesh.*``), answered by the connection itself: no mesh call.

* ``mesh.hello`` (no params): ``{"connection", "gateway", "topics"}``.
* ``mesh.ping`` (no params): ``"pong"``. HAProxy's health check: an answer
  proves that the gateway's event loop runs.
* ``mesh.subscribe`` (topics, see :func:`.subscriptions.topics_param`): the
  connection's subscriptions, sorted; all or nothing (:func:`.subscriptions.subscribe`).
* ``mesh.unsubscribe`` (topics; none: all): the connection's subscriptions, sorted.

Anything else under ``mesh.`` is ``method_not_found``. Errors are raised as
:class:`~meshkit.gateway.jsonrpc.RpcError`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..untrusted import clip
from . import jsonrpc
from .jsonrpc import Request, RpcError
from .options import GatewayOptions
from .subscriptions import subscribe, topics_param

NAMES = ("mesh.hello", "mesh.ping", "mesh.subscribe", "mesh.unsubscribe")


class Caller(Protocol):
    """What a built-in needs of the connection calling it."""

    id: str
    gateway_id: str
    options: GatewayOptions
    subscriptions: set[str]


def call(conn: Caller, request: Request) -> Any:
    """The result of built-in ``request.method`` for ``conn``; raises :class:`RpcError`."""
    name = request.method
    if name == "mesh.ping":
        return "pong"
    if name == "mesh.hello":
        return {"connection": conn.id, "gateway": conn.gateway_id, "topics": list(conn.options.topics)}
    if name == "mesh.subscribe":
        return subscribe(conn.subscriptions, topics_param(request.params),
                         conn.options.topics, conn.options.max_subscriptions)
    if name == "mesh.unsubscribe":
        topics = topics_param(request.params)
        conn.subscriptions.difference_update(topics or conn.subscriptions.copy())
        return sorted(conn.subscriptions)
    raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"no built-in method {clip(name)!r}",
                   {"builtins": list(NAMES)})
