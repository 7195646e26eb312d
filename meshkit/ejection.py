"""Outlier ejection: instances that keep failing a caller are left out of its choice for a while.

One :class:`Ejector` belongs to one client's pool and judges instances only
by that client's own outcomes (each caller decides for itself, like Linkerd's
failure accrual and Envoy's outlier detection):

* an outcome is a **failure** if the instance was lost with the call in
  flight, the call's deadline passed waiting for it, or it answered with one
  of ``Settings.eject_codes`` (default ``handler_error``); any other answer
  is a **success** and resets the count;
* after ``Settings.eject_after_failures`` failures in a row (default 7) the
  instance is **ejected** for ``eject_base_time`` x 2^(ejections so far),
  capped at ``eject_max_time``, times a jitter factor drawn uniformly from
  [1 - ``eject_jitter``, 1 + ``eject_jitter``] so that many callers do not
  probe in step;
* when that time is over the instance is **probing**: it is offered one
  request at a time (a probe is given up on after ``eject_base_time``, so a
  probe whose waiter vanished does not block the instance for ever); a
  success returns it to full traffic, a failure ejects it again for longer;
* an instance that stays healthy for ``eject_max_time`` after its last
  ejection starts again from the base time;
* no more than ``eject_max_share`` of a service's instances (at least one,
  never the only one) are ejected at once: past that, failures are still
  counted but the instance stays in choice, so a service whose every
  instance fails still gets traffic and its callers see its errors.

All times come from ``clock``, the jitter from ``rng``: the unit tests drive
both. The fast path (a success on an instance with no failures) is one
dictionary lookup.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from .clock import SYSTEM_CLOCK, Clock
from .codes import StrEnum
from .config import Settings


class Health(StrEnum):
    """An instance as one caller's ejector sees it."""

    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBING = "probing"


@dataclass(slots=True)
class _Record:
    service: str
    failures: int = 0  # in a row
    ejections: int = 0  # since it was last healthy for eject_max_time
    ejected_until: float = 0.0  # 0: not ejected
    last_ejected: float = 0.0
    probe_started: float | None = None


@dataclass(frozen=True, slots=True)
class EjectionState:
    """One instance's row in :meth:`Ejector.snapshot` (what metrics and ``meshkit ejections`` show)."""

    key: str
    service: str
    health: Health
    failures: int
    ejections: int
    ejected_for: float  # seconds left, 0 unless ejected


class Ejector:
    """Per-instance failure accounting and ejection for one caller (see the module doc)."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK,
                 rng: random.Random | None = None) -> None:
        self._after = settings.eject_after_failures
        self._base = settings.eject_base_time
        self._max = settings.eject_max_time
        self._jitter = settings.eject_jitter
        self._share = settings.eject_max_share
        self.codes = frozenset(c.strip() for c in settings.eject_codes.split(",") if c.strip())
        self._clock = clock
        self._rng = rng or random.Random()
        # Instances with failures or ejections on record (never rebound: callers on the hot path
        # test it for emptiness before calling in).
        self.records: dict[str, _Record] = {}
        self.ejections_total = 0  # ejections made, ever (a metric)

    @property
    def enabled(self) -> bool:
        return self._after > 0

    def health(self, key: str) -> Health:
        """``key``'s health now (an ejection that ran out is ``PROBING``)."""
        record = self.records.get(key)
        if record is None or not record.ejected_until:
            return Health.HEALTHY
        return Health.EJECTED if self._clock.now() < record.ejected_until else Health.PROBING

    def allows(self, key: str) -> bool:
        """Whether a request may be sent to ``key`` now: healthy, or probing with no probe out."""
        record = self.records.get(key)
        if record is None or not record.ejected_until:
            return True
        now = self._clock.now()
        if now < record.ejected_until:
            return False
        return record.probe_started is None or now - record.probe_started >= self._base

    def sent(self, key: str) -> None:
        """A request was sent to ``key``: if it is probing, that request is its probe."""
        record = self.records.get(key)
        if record is not None and record.ejected_until and self._clock.now() >= record.ejected_until:
            record.probe_started = self._clock.now()

    def succeeded(self, key: str) -> None:
        """``key`` answered well: its failures in a row are over, a probe returns it to traffic."""
        record = self.records.get(key)
        if record is None:
            return
        now = self._clock.now()
        if record.ejected_until and now < record.ejected_until:
            return  # an answer to a request sent before the ejection: the probe decides
        if record.ejections and now - record.last_ejected < self._max:
            # Keep the ejection count (the next ejection is longer) until it has been healthy a while.
            record.failures = 0
            record.ejected_until = 0.0
            record.probe_started = None
            return
        del self.records[key]

    def failed(self, key: str, service: str, instances: Iterable[str]) -> bool:
        """Count a failure of ``key`` (an instance of ``service``, whose instances are ``instances``).

        Returns True if this failure ejected it.
        """
        if not self.enabled:
            return False
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = _Record(service)
        now = self._clock.now()
        if record.ejected_until and now < record.ejected_until:
            return False  # already out; a late failure changes nothing
        record.failures += 1
        probing = bool(record.ejected_until)
        if not probing and record.failures < self._after:
            return False
        if not probing and not self._may_eject(key, list(instances), now):
            return False
        span = min(self._max, self._base * 2 ** min(record.ejections, 30))
        span *= 1 + self._jitter * (2 * self._rng.random() - 1)
        record.ejections += 1
        record.ejected_until = now + span
        record.last_ejected = now
        record.probe_started = None
        self.ejections_total += 1
        return True

    def _may_eject(self, key: str, instances: list[str], now: float) -> bool:
        if len(instances) <= 1:
            return False  # the only instance: ejecting it would only turn its errors into no_instance
        out = sum(1 for k in instances if k != key and self._is_out(k, now))
        return out + 1 <= max(1, int(self._share * len(instances)))

    def _is_out(self, key: str, now: float) -> bool:
        record = self.records.get(key)
        return record is not None and record.ejected_until > 0 and now < record.ejected_until

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of instances not in ``keep`` (they left the registry)."""
        kept = set(keep)
        for key in [k for k in self.records if k not in kept]:
            del self.records[key]

    def ejected(self, service: str | None = None) -> int:
        """How many instances (of ``service``, or of all) are ejected now."""
        now = self._clock.now()
        return sum(1 for k, r in self.records.items()
                   if (service is None or r.service == service) and self._is_out(k, now))

    def snapshot(self) -> list[EjectionState]:
        """Every instance with failures or ejections on record, sorted by key."""
        now = self._clock.now()
        return [EjectionState(k, r.service, self.health(k), r.failures, r.ejections,
                              max(0.0, r.ejected_until - now) if r.ejected_until else 0.0)
                for k, r in sorted(self.records.items())]
