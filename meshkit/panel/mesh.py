"""What the panel asks the instances themselves: the reserved ``_mesh.*`` methods, behind one interface.

:class:`MeshReader` is the interface the panel's collectors and taps use,
so unit tests drive them with a fake; :class:`ObserveReader` implements it
over :mod:`meshkit.observe.query` and one :class:`~meshkit.client.AsyncClient`
(every call goes to one instance, by its id). Answers are remote input:
callers check their shape before using them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from ..client import AsyncClient
from ..observe import query
from ..record import InstanceRecord


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

    async def trace(self, trace_id: str) -> Mapping[str, Any]:
        """``{"spans": [...], "missing": {instance: why}}``: every span of ``trace_id`` live instances hold."""
        ...

    async def inspect(self, instance_id: str) -> Mapping[str, Any]:
        """``{info, stats, inflight, spans, errors}`` of one instance (what ``meshkit inspect`` shows)."""
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
    """:class:`MeshReader` over one started :class:`~meshkit.client.AsyncClient` and :mod:`meshkit.observe.query`.

    Every ``_mesh.*`` call goes to one instance by id
    (:func:`meshkit.observe.query.ask`) and is bounded by ``timeout``
    seconds; :meth:`trace` is :func:`meshkit.observe.query.trace`.
    """

    def __init__(self, client: AsyncClient, timeout: float = 1.5) -> None:
        self.client = client
        self.timeout = timeout

    def instances(self) -> list[InstanceRecord]:
        return [r for r in self.client.registry.instances() if not r.service.startswith("_")]

    async def _ask(self, record: InstanceRecord, method: str, *args: Any, **kwargs: Any) -> Any:
        return await query.ask(self.client, record.instance_id, method, *args, timeout=self.timeout, **kwargs)

    async def stats(self, record: InstanceRecord) -> Mapping[str, Any]:
        answer = await self._ask(record, "stats")
        return answer if isinstance(answer, Mapping) else {}

    async def spans(self, record: InstanceRecord, trace_id: str | None = None,
                    limit: int = 200) -> list[Mapping[str, Any]]:
        answer = await self._ask(record, "spans", trace_id=trace_id, limit=limit)
        found = answer.get("spans") if isinstance(answer, Mapping) else answer
        return [s for s in found if isinstance(s, Mapping)] if isinstance(found, list) else []

    async def trace(self, trace_id: str) -> Mapping[str, Any]:
        answer = await query.trace(self.client, trace_id, timeout=self.timeout)
        return {"spans": answer.get("spans", []), "missing": answer.get("missing", {})}

    async def inspect(self, instance_id: str) -> Mapping[str, Any]:
        return await query.inspect_instance(self.client, instance_id)

    async def tap_open(self, record: InstanceRecord, filter: Mapping[str, Any], max_rps: float,
                       max_events: int, ttl_s: float) -> str:
        # The filter goes positionally: the reserved method names its parameter raw_filter.
        return str(await self._ask(record, "tap.open", dict(filter), max_rps=max_rps,
                                   max_events=max_events, ttl_s=ttl_s))

    async def tap_poll(self, record: InstanceRecord, tap_id: str, after: int) -> Mapping[str, Any]:
        answer = await self._ask(record, "tap.poll", tap_id, after=after)
        return answer if isinstance(answer, Mapping) else {}

    async def tap_close(self, record: InstanceRecord, tap_id: str) -> None:
        await self._ask(record, "tap.close", tap_id)
