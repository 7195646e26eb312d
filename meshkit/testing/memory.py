"""A registry kept in memory, behind the interface a service uses: no Redis.

:class:`MemoryRegistry` is a :class:`~meshkit.registry.Registry` whose
storage is a dict: :meth:`~MemoryRegistry.start` needs no server, every
write is applied to the view at once (as if announced on the changes
channel), and the records its :meth:`~MemoryRegistry.registration` hands
out are :class:`MemoryRegistration` objects with the real heartbeat, states
and reports, timed by the registry's clock. What the real registry does
with a TTL (a killed instance's record expires) is left out: a test removes
a record itself (:meth:`MemoryRegistry.remove`).

Setting :attr:`MemoryRegistry.unreachable` makes every write fail with
``ConnectionError`` until it is cleared, as if Redis were down, so a test
can drive a registration through an outage and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from ..record import InstanceRecord
from ..registration import Registration
from ..registry import Registry

__all__ = ["MemoryRegistration", "MemoryRegistry"]

# Record endpoints must be tcp://host:port; an in-process service listens on
# an ipc:// path instead, so its record is checked with this in its place.
_STAND_IN_ENDPOINT = "tcp://127.0.0.1:1"


class MemoryRegistry(Registry):
    """The registry and its storage in one object, in memory (see the module doc)."""

    def __init__(self, settings: Settings | None = None, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(settings or Settings(), clock=clock)
        self.stored: dict[str, InstanceRecord] = {}  # what Redis would hold, by record key
        self.writes: dict[str, int] = {}  # successful writes per record key (heartbeats included)
        self.unreachable = False

    async def start(self, wait: float = 2.0) -> None:
        """Load the stored records into the view; nothing runs in the background."""
        self._replace_all(list(self.stored.values()), self.clock.now())
        self.connected = self.synced = True
        self._rebuild()

    async def close(self) -> None:
        """Nothing to close: there is no connection."""
        self._closing = True

    async def scan(self) -> list[InstanceRecord]:
        """Every stored record (raises ``ConnectionError`` while :attr:`unreachable`)."""
        self._check_reachable()
        return list(self.stored.values())

    def registration(self, record: InstanceRecord, on_error: Callable[[], None] | None = None) -> Registration:
        """A :class:`MemoryRegistration` writing ``record`` into this registry."""
        return MemoryRegistration(self, record, on_error)

    def add(self, record: InstanceRecord) -> None:
        """Store ``record`` and show it in the view at once (an instance the test makes up)."""
        self.stored[record.key] = record
        self.apply(record)

    def remove(self, key: str) -> None:
        """Delete the record under ``key`` and drop it from the view at once."""
        self.stored.pop(key, None)
        self.apply(None, key)

    def _check_reachable(self) -> None:
        if self.unreachable:
            raise ConnectionError("the memory registry is set unreachable")


class MemoryRegistration(Registration):
    """A :class:`~meshkit.registration.Registration` whose record lives in a :class:`MemoryRegistry`."""

    def __init__(self, registry: MemoryRegistry, record: InstanceRecord,
                 on_error: Callable[[], None] | None = None) -> None:
        self.memory = registry
        super().__init__(registry.settings, record, on_error, clock=registry.clock)

    def _validated(self, record: InstanceRecord) -> InstanceRecord:
        if record.endpoint.startswith(("ipc://", "inproc://")):
            dataclasses.replace(record, endpoint=_STAND_IN_ENDPOINT).validate()
            return record
        return record.validate()

    async def _store(self, rec: InstanceRecord, announce: bool) -> bool:
        self.memory._check_reachable()
        existed = rec.key in self.memory.stored
        self.memory.stored[rec.key] = rec
        self.memory.writes[rec.key] = self.memory.writes.get(rec.key, 0) + 1
        if announce or not existed:
            self.memory.apply(rec)
        return existed

    async def _remove(self, key: str) -> None:
        self.memory._check_reachable()
        self.memory.remove(key)
