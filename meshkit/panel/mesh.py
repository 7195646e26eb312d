"""What the panel asks the instances themselves: the reserved ``_mesh.*`` methods, behind one interface.

:class:`MeshReader` is the interface the panel's collectors and taps use,
so unit tests drive them with a fake; :class:`ObserveReader` implements it
over :mod:`meshkit.observe.query` and one :class:`~meshkit.client.AsyncClient`
(every call goes to one instance, by its id). Answers are remote input:
callers check their shape before using them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from ..client import AsyncClient
from ..record import InstanceRecord

MAX_TRACE_SPANS = 2000  # spans of one trace asked of one instance


class MeshReader(Protocol):
    """Reading the mesh: the registry view, and the ``_mesh.*`` methods of one instance."""

    def instances(self) -> list[InstanceRecord]:
        """Every instance in the local registry view (no I/O)."""
        ...

    async def stats(self, record: InstanceRecord) -> Mapping[str, Any]:
        """``_mesh.stats()`` of that instance."""
        ...

    async def spans(self, record: InstanceRecord, trace_id: str | None = None,
                    limit: int = 200) -> list[Mapping[str, Any]]:
        """``_mesh.spans(...)`` of that instance: its most recent spans (of ``trace_id`` only, if given)."""
        ...

    async def trace(self, trace_id: str) -> list[Mapping[str, Any]]:
        """Every span of ``trace_id`` that any live instance still holds."""
        ...

    async def tap_open(self, record: InstanceRecord, filter: Mapping[str, Any], max_rps: float,
                       max_events: int, ttl_s: float) -> str:
        """``_mesh.tap.open(...)`` on that instance; the tap's id."""
        ...

    async def tap_poll(self, record: InstanceRecord, tap_id: str, after: int) -> Mapping[str, Any]:
        """``_mesh.tap.poll(tap_id, after)``: ``{"events": [...], "next": n, "closed": bool}``."""
        ...

    async def tap_close(self, record: InstanceRecord, tap_id: str) -> None:
        """``_mesh.tap.close(tap_id)``."""
        ...


class ObserveReader:
    """:class:`MeshReader` over one started :class:`~meshkit.client.AsyncClient`.

    Every ``_mesh.*`` call goes to one instance by id
    (:meth:`AsyncClient.call_instance`) and is bounded by ``timeout``
    seconds; :meth:`trace` asks every live instance at once.
    """

    def __init__(self, client: AsyncClient, timeout: float = 1.5) -> None:
        self.client = client
        self.timeout = timeout

    def instances(self) -> list[InstanceRecord]:
        return self.client.registry.instances()

    async def _call(self, record: InstanceRecord, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.client.call_instance(record.instance_id, method, *args, timeout=self.timeout, **kwargs)

    async def stats(self, record: InstanceRecord) -> Mapping[str, Any]:
        answer = await self._call(record, "_mesh.stats")
        return answer if isinstance(answer, Mapping) else {}

    async def spans(self, record: InstanceRecord, trace_id: str | None = None,
                    limit: int = 200) -> list[Mapping[str, Any]]:
        answer = await self._call(record, "_mesh.spans", trace_id=trace_id, limit=limit)
        found = answer.get("spans") if isinstance(answer, Mapping) else answer
        return [s for s in found if isinstance(s, Mapping)] if isinstance(found, list) else []

    async def trace(self, trace_id: str) -> list[Mapping[str, Any]]:
        answers = await asyncio.gather(*(self.spans(r, trace_id=trace_id, limit=MAX_TRACE_SPANS)
                                         for r in self.instances()), return_exceptions=True)
        spans: dict[tuple[str, str], Mapping[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, list):
                for span in answer:
                    spans[(str(span.get("instance")), str(span.get("span_id")))] = span
        return sorted(spans.values(), key=lambda s: int(s.get("start_unix_us") or 0))

    async def tap_open(self, record: InstanceRecord, filter: Mapping[str, Any], max_rps: float,
                       max_events: int, ttl_s: float) -> str:
        return str(await self._call(record, "_mesh.tap.open", filter=dict(filter), max_rps=max_rps,
                                    max_events=max_events, ttl_s=ttl_s))

    async def tap_poll(self, record: InstanceRecord, tap_id: str, after: int) -> Mapping[str, Any]:
        answer = await self._call(record, "_mesh.tap.poll", tap_id, after=after)
        return answer if isinstance(answer, Mapping) else {}

    async def tap_close(self, record: InstanceRecord, tap_id: str) -> None:
        await self._call(record, "_mesh.tap.close", tap_id)
