"""The plan that brings HAProxy's servers in line with a model: pure, so it is tested alone.

:func:`plan` compares the servers a :class:`~meshkit.haproxy.model.Model`
wants with the servers HAProxy reports (``show servers state``) and returns
the runtime commands that close the gap, one :class:`Step` per server:

* missing server → ``add server`` (check options spelled out), ``enable
  health``, then ``set server ... state ready`` (or ``drain``). In that order,
  so that a server never takes traffic before its health check runs.
* present server → whatever differs: address, disabled health check, state
  (``ready`` for an ``up`` instance, ``drain`` for a ``draining`` one).
* server whose instance is gone → ``set server ... state maint`` (no new
  connections; the established ones go on), then ``del server``, always the
  last command of the step. HAProxy refuses the delete while connections are
  still attached; every later round sends it again, so the server goes once
  its last client has left.

Sessions are never shut down: a record also disappears when a healthy
gateway merely lost Redis (its record expired) or its host name failed to
resolve, and cutting its clients would be the only harm done. A gateway that
really stopped has closed its clients itself, and a dead one's connections
are dead already.

HAProxy 2.6 facts the commands rely on (see docs/haproxy.md):

* ``add server`` creates a server in maintenance with its health check
  disabled, and ignores ``default-server``: options are spelled out, and the
  server needs ``enable health`` and ``set server ... state ready``.
* ``del server`` refuses a server that is not in maintenance or still has
  connections attached.

This is the one place that writes these commands. Only backends of the model
are touched: other backends of an HAProxy the sync process is attached to are
left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .model import Model
from .runtime import CHECK_CONFIGURED, ServerState

ADD, UPDATE, REMOVE = "add", "update", "remove"


@dataclass(frozen=True)
class Step:
    """The commands for one server, to run in order (stop at the first failure).

    A ``REMOVE`` step ends with its ``del server``, which HAProxy refuses
    while connections are attached: that refusal means "not yet", not failure.
    """

    action: str  # ADD, UPDATE or REMOVE
    backend: str
    server: str
    commands: tuple[str, ...]
    instance: str = ""  # the registry key it came from (empty for removals)

    def __str__(self) -> str:
        return f"{self.action} {self.backend}/{self.server}"


def plan(model: Model, actual: Iterable[ServerState], remove: bool = True) -> list[Step]:
    """Steps that make HAProxy's servers (``actual``) match ``model``: adds, then updates, then removals.

    With ``remove=False`` servers unknown to the model are kept (used while the
    registry has not been read yet, so an empty view never empties HAProxy).
    """
    adds: list[Step] = []
    updates: list[Step] = []
    removals: list[Step] = []
    by_backend: dict[str, dict[str, ServerState]] = {}
    for state in actual:
        by_backend.setdefault(state.backend, {})[state.name] = state

    for backend in model.backends:
        present = by_backend.get(backend.name, {})
        for server in backend.servers:
            target = f"{backend.name}/{server.name}"
            wanted_state = "drain" if server.draining else "ready"
            have = present.get(server.name)
            if have is None:
                adds.append(Step(ADD, backend.name, server.name, (
                    f"add server {target} {server.address} {model.server_options}",
                    f"enable health {target}",
                    f"set server {target} state {wanted_state}",
                ), server.instance))
                continue
            commands = []
            if (have.host, have.port) != (server.host, server.port):
                commands.append(f"set server {target} addr {server.host} port {server.port}")
            if have.check_state & CHECK_CONFIGURED and not have.health_enabled:
                commands.append(f"enable health {target}")
            if server.draining:
                if have.in_maintenance or not have.draining:
                    commands.append(f"set server {target} state drain")
            elif have.in_maintenance or have.draining:
                commands.append(f"set server {target} state ready")
            if commands:
                updates.append(Step(UPDATE, backend.name, server.name, tuple(commands), server.instance))
        if not remove:
            continue
        for name, have in sorted(present.items()):
            if backend.server(name) is not None:
                continue
            target = f"{backend.name}/{name}"
            commands = [] if have.in_maintenance else [f"set server {target} state maint"]
            commands.append(f"del server {target}")
            removals.append(Step(REMOVE, backend.name, name, tuple(commands)))
    return adds + updates + removals
