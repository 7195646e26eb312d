"""Shared fixtures of the core integration tests (the mesh fixtures come from meshkit.testing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import zmq
from haproxykit import FakeRegistry, Gateway

from meshkit import Settings


@pytest.fixture
def gateways() -> Iterator[Callable[[str], Gateway]]:
    """Make greeting-and-echo TCP servers standing in for gateways behind HAProxy; all closed afterwards."""
    made: list[Gateway] = []

    def make(name: str) -> Gateway:
        made.append(Gateway(name))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


@pytest.fixture
def registry(mesh_settings: Settings) -> Iterator[FakeRegistry]:
    """A registry writer for HAProxy tests: records put straight into this test's Redis namespace."""
    fake = FakeRegistry(mesh_settings)
    yield fake
    fake.client.close()


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private ZeroMQ context; sockets a failed test left open are closed at teardown."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
