"""The demo application (services/jobs.py, services/shares.py) through a gateway, as a client sees it."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lineclient import LineClient, error_code, line_clients

from meshkit.gateway import jsonrpc
from meshkit.testing import ServiceProcess

GATEWAY = "meshkit.gateway:Gateway"
JOBS = "services.jobs:JobAnnouncer"
SHARES = "services.shares:ShareLogger"

StartService = Callable[..., list[ServiceProcess]]


@pytest.fixture
def clients() -> Iterator[Callable[[str], LineClient]]:
    yield from line_clients()


def nonce_with(job: dict[str, Any], accepted: bool, skip: int = 0) -> str:
    """The ``skip``-th nonce that meets (or misses) ``job``'s target, by the documented rule."""
    def meets(nonce: str) -> bool:
        digest = hashlib.sha256(f"{job['job_id']}:{nonce}".encode()).hexdigest()
        return int(digest, 16) <= int(job["target"], 16)
    found = (n for n in (f"{i:08x}" for i in itertools.count()) if meets(n) == accepted)
    return next(itertools.islice(found, skip, None))


@pytest.fixture
def demo(start_service: StartService, tmp_path: Path) -> str:
    config = tmp_path / "demo.toml"
    config.write_text('[services.jobs]\njob_interval = 0.5\ndifficulty = 4\n\n'
                      '[services.gateway]\nservices = ["shares", "jobs"]\n')
    env = {"MESHKIT_CONFIG": str(config)}
    start_service(JOBS, env=env)
    start_service(SHARES, count=2, env=env)
    gateway: list[ServiceProcess] = start_service(GATEWAY, env=env)
    assert gateway[0].record is not None
    return gateway[0].record.listeners["stratum"]


def test_a_miner_session(demo: str, clients: Callable[[str], LineClient]) -> None:
    miner = clients(demo)
    early = miner.call("shares.submit", ["00000000", "00000000"])
    assert error_code(early) == jsonrpc.HANDLER_ERROR
    assert early["error"]["message"] == "InvalidShare: call shares.login first"

    assert miner.call("mesh.subscribe", ["jobs.*"])["result"] == ["jobs.*"]
    login = miner.call("shares.login", ["alice.rig1"])["result"]
    assert login["worker"] == "alice.rig1" and login["connection"]
    job = miner.push()["params"]  # a new job arrives every half second
    assert set(job) == {"job_id", "target", "created"}

    good, bad = nonce_with(job, True), nonce_with(job, False)
    accepted = miner.call("shares.submit", [job["job_id"], good])["result"]
    assert accepted["accepted"] and accepted["verdict"] == "accepted"
    rejected = miner.call("shares.submit", {"job_id": job["job_id"], "nonce": bad})["result"]
    assert rejected["verdict"] == "low_difficulty" and not rejected["accepted"]
    # A repeat is a retry: the same verdict, counted once.
    assert miner.call("shares.submit", [job["job_id"], good])["result"]["verdict"] == "accepted"
    # Someone else submitting the same nonce gets "duplicate".
    other = clients(demo)
    other.call("shares.login", ["bob"])
    assert other.call("shares.submit", [job["job_id"], good])["result"]["verdict"] == "duplicate"

    malformed = miner.call("shares.submit", [job["job_id"], "xyz"])
    assert error_code(malformed) == jsonrpc.HANDLER_ERROR
    assert malformed["error"]["data"] == {"code": "handler_error", "type": "InvalidShare"}
    unknown = miner.call("shares.submit", ["nosuchjob", good])
    assert "unknown job" in unknown["error"]["message"]
    assert error_code(miner.call("shares.submit", ["only one argument"])) == jsonrpc.INVALID_PARAMS

    while miner.push()["params"]["job_id"] == job["job_id"]:
        pass  # wait for the next job
    stale = miner.call("shares.submit", [job["job_id"], nonce_with(job, True, 1)])["result"]
    assert stale["verdict"] == "stale"

    assert miner.call("shares.stats")["result"] == {"worker": "alice.rig1", "accepted": 1,
                                                    "rejected": 2}
    assert other.call("shares.stats")["result"] == {"worker": "bob", "accepted": 0, "rejected": 1}
    current = miner.call("jobs.current")["result"]
    assert current["job_id"] != job["job_id"]
