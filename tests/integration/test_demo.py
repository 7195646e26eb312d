"""The restart proof's toy backends (services/jobs.py, services/shares.py) through a gateway, as a client sees it.

The demo itself is the Stratum pool now: tests/integration/test_stratum_pool.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import itertools
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lineclient import LineClient, error_code, line_clients
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import Pipeline

from meshkit import Service, Settings
from meshkit.context import CallContext, reset_current, set_current
from meshkit.gateway import jsonrpc
from meshkit.testing import ServiceProcess, test_settings
from meshkit.trace import TraceContext

pytestmark = pytest.mark.integration

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


# -- the services in this process, against the test's Redis ----------------------------

ROOT = Path(__file__).resolve().parents[2]
S = TypeVar("S", bound=Service)


def demo_modules() -> tuple[Any, Any]:
    """``services.jobs`` and ``services.shares`` (under pytest the project root is not on sys.path)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("services.jobs"), importlib.import_module("services.shares")
    finally:
        sys.path.remove(str(ROOT))


@contextlib.asynccontextmanager
async def in_process(cls: type[S], settings: Settings) -> AsyncIterator[S]:
    """An instance of ``cls`` that is never started: its handlers are called directly."""
    service = cls(settings)
    try:
        yield service
    finally:
        await service.on_stop()
        await service.kill()


@contextlib.contextmanager
def serving(conn_id: str) -> Iterator[None]:
    """Run the body as a call a gateway made for connection ``conn_id``."""
    token = set_current(CallContext("shares", "submit", TraceContext.new_root(), meta={"conn": conn_id}))
    try:
        yield
    finally:
        reset_current(token)


class Died(Exception):
    """The backend died right after Redis did what it asked, before it heard back."""


def test_a_submission_interrupted_anywhere_and_retried_is_counted_once(
    mesh_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, shares_module = demo_modules()

    async def main() -> None:
        async with in_process(shares_module.ShareLogger, mesh_settings) as shares:
            job = jobs.make_job(4)
            await shares.board.post(job)
            # Each Redis round trip of one submit (a command or a pipeline) is
            # counted; the ``crash_at``-th one reaches Redis, then the caller "dies".
            trips = {"count": 0, "crash_at": 0}

            def after(result: Any) -> Any:
                trips["count"] += 1
                if trips["count"] == trips["crash_at"]:
                    raise Died(f"after round trip {trips['count']}")
                return result

            command, execute = shares.redis.execute_command, Pipeline.execute

            async def counted_command(*args: Any, **options: Any) -> Any:
                return after(await command(*args, **options))

            async def counted_execute(self: Pipeline, raise_on_error: bool = True) -> Any:
                return after(await execute(self, raise_on_error))

            monkeypatch.setattr(shares.redis, "execute_command", counted_command)
            monkeypatch.setattr(Pipeline, "execute", counted_execute)
            for crash_at in itertools.count(1):
                conn_id = f"gw1-{crash_at}"
                await shares.connections.open(conn_id, "gw1", "127.0.0.1:1")
                nonce = nonce_with(job, True, skip=crash_at)
                with serving(conn_id):
                    await shares.login("w")
                    trips.update(count=0, crash_at=crash_at)
                    try:
                        first: Any = await shares.submit(job["job_id"], nonce)
                    except Died:
                        first = None
                    trips["crash_at"] = 0
                    # The gateway's retry, on this or another instance.
                    retry = await shares.submit(job["job_id"], nonce)
                    stats = await shares.stats()
                assert retry["verdict"] == "accepted", crash_at
                assert stats == {"worker": "w", "accepted": 1, "rejected": 0}, crash_at
                if first is not None:  # every round trip of submit was interrupted once
                    assert first["verdict"] == "accepted"
                    break

    asyncio.run(main())


def test_nonces_are_remembered_as_long_as_their_job_and_both_services_pool_redis(
    redis_server: Any,
) -> None:
    settings = test_settings(redis_server.url, service_overrides={"jobs": {"job_interval": 30}})
    jobs_module, shares_module = demo_modules()

    async def main() -> None:
        async with in_process(jobs_module.JobAnnouncer, settings) as jobs, \
                in_process(shares_module.ShareLogger, settings) as shares:
            assert jobs.board.keep == shares.board.keep == 300.0
            for service in (jobs, shares):
                assert isinstance(service.redis.connection_pool, BlockingConnectionPool)
            job = await jobs.announce()
            await shares.connections.open("gw1-1", "gw1", "127.0.0.1:1")
            with serving("gw1-1"):
                await shares.login("w")
                await shares.submit(job["job_id"], nonce_with(job, True))
            # A duplicate must be recognised for as long as the job can be submitted to.
            assert await shares.redis.pttl(shares.board.shares_key(job["job_id"])) > 290_000
            assert await shares.redis.pttl(jobs.board.job_key(job["job_id"])) > 290_000

    asyncio.run(main())
