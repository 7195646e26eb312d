"""The restart proof's scale-up measurement (``bench/restarts.py``, ``c_scale``), on a stand-in stack.

No processes here: the registry the proof polls is a stand-in in which each
new instance appears at a set moment, so the test knows when every instance
registered and when it first served. (``test_restarts.py`` runs the real thing.)
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _restarts() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("restarts")
    finally:
        sys.path.remove(str(BENCH))


restarts = _restarts()


@dataclass
class Record:
    pid: int
    instance_id: str
    is_up: bool = True


class Instance:
    """A stand-in for a ServiceProcess that registers ``delay`` seconds after it is spawned."""

    def __init__(self, pid: int, delay: float) -> None:
        self.pid = pid
        self.target = "services.mining:Mining"
        self.registers_at = time.monotonic() + delay
        self.record: Record | None = None

    def running(self) -> bool:
        return True

    def tail(self) -> str:
        return ""

    def terminate(self) -> int:
        return 0


class Stack:
    """Just what the scale scenario touches of ``proofstack.Stack``."""

    def __init__(self, delays: list[float]) -> None:
        self.config = restarts.ProofConfig(clients=0, settle=0.0, scale_up_to=len(delays),
                                           scale_down_to=len(delays))
        self.settings = object()
        self.address = ("127.0.0.1", 1)
        self.backends: list[Instance] = []
        self._delays = list(delays)
        self.spawned: list[Instance] = []

    def spawn(self, target: str) -> Instance:
        instance = Instance(1000 + len(self.spawned), self._delays[len(self.spawned)])
        self.spawned.append(instance)
        return instance

    def records(self, settings: Any = None, service: str | None = None) -> list[Record]:
        now = time.monotonic()
        return [Record(i.pid, f"new{i.pid}") for i in self.spawned if i.registers_at <= now]

    def start_many(self, target: str, count: int) -> list[Instance]:
        """What the proof used before timing each instance: return once all registered."""
        spawned = [self.spawn(target) for _ in range(count)]
        while len(self.records()) < len(self.spawned):
            time.sleep(0.01)
        for instance, record in zip(spawned, self.records(), strict=True):
            instance.record = record
        return spawned


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Stack:
    fake = Stack(request.param)
    monkeypatch.setattr(restarts, "read_records", fake.records, raising=False)
    return fake


@pytest.mark.parametrize("stack", [[0.0, 2.0]], indirect=True)
def test_each_new_instance_is_timed_from_its_own_registration(stack: Stack) -> None:
    proof = restarts.Proof(stack)
    spawned_at = time.monotonic()
    # The first instance registers at once but serves only 1.5 s later: too
    # slow, even though the second registers 2 s in and serves at once.
    proof.tally.first_served.update({"new1000": spawned_at + 1.5, "new1001": spawned_at + 2.05})
    asyncio.run(proof.c_scale())
    info = proof.extra["c_scale"]
    assert info["scaled_up_to"] == 2
    assert 1.0 < info["first_traffic_s"] <= 1.5, info
    assert proof.checks["c_new_instances_take_traffic_within_1s"] is False


@pytest.mark.parametrize("stack", [[]], indirect=True)
def test_scaling_up_to_no_more_instances_measures_nothing(stack: Stack) -> None:
    proof = restarts.Proof(stack)
    asyncio.run(proof.c_scale())
    assert proof.extra["c_scale"]["first_traffic_s"] is None
    assert "c_new_instances_take_traffic_within_1s" not in proof.checks
    assert proof.checks["c_removed_exit_0"]
