"""The demo pool's announcer (services/pooljobs.py) restarted: miners' work stays valid.

A restarted announcer loads the jobs the last one kept in Redis, answers
``jobs.recent`` with them, and does not start with ``clean_jobs`` when the
chain has not moved; so a ``mining`` instance started after it still judges
shares for the jobs miners were given before the restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from meshkit import Client, Settings
from meshkit.testing import RedisServer, ServiceProcess, wait_until

pytestmark = pytest.mark.integration

JOBS = "services.pooljobs:PoolJobs"
StartService = Callable[..., list[ServiceProcess]]


def stored_jobs(redis_server: RedisServer, settings: Settings) -> list[dict[str, Any]]:
    """The announcer's jobs in Redis, newest first."""
    client = redis_server.client()
    try:
        return [msgpack.unpackb(raw, raw=False) for raw in client.lrange(f"{settings.namespace}:stratum:jobs", 0, -1)]
    finally:
        client.close()


def test_a_restarted_announcer_resumes_the_same_block(
    start_service: StartService, mesh_settings: Settings, redis_server: RedisServer, tmp_path: Path,
) -> None:
    config = tmp_path / "pool.toml"
    config.write_text("[services.jobs]\njob_interval = 0.5\nblock_interval = 3600.0\n")
    env = {"MESHKIT_CONFIG": str(config)}
    [first] = start_service(JOBS, env=env)
    wait_until(lambda: len(stored_jobs(redis_server, mesh_settings)) >= 3, 10, "three jobs in Redis")
    assert first.terminate() == 0
    before = stored_jobs(redis_server, mesh_settings)
    assert before[-1]["clean_jobs"], "a fresh pool's first job starts the block"
    assert len(before) <= 16, "only the last 16 jobs are kept"

    [second] = start_service(JOBS, env=env)
    wait_until(lambda: stored_jobs(redis_server, mesh_settings)[0]["job_id"] != before[0]["job_id"],
               10, "the restarted announcer's first job")
    after = stored_jobs(redis_server, mesh_settings)
    old_ids = [job["job_id"] for job in before]
    new = [job for job in after if job["job_id"] not in old_ids]
    first_new = new[-1]  # newest first: the last of the new ones is the first announced
    assert not first_new["clean_jobs"], first_new
    assert first_new["prevhash"] == before[0]["prevhash"]
    assert int(first_new["job_id"], 16) > int(before[0]["job_id"], 16), "job ids keep growing"

    with Client(mesh_settings) as client:
        recent = [job["job_id"] for job in client.call("jobs", "recent", wait=True, timeout=5.0)]
    assert old_ids[0] in recent, (old_ids, recent)  # the job miners were working on before
    assert second.terminate() == 0


def test_a_fresh_announcer_with_nothing_stored_starts_a_clean_block(
    start_service: StartService, mesh_settings: Settings, redis_server: RedisServer, tmp_path: Path,
) -> None:
    config = tmp_path / "pool.toml"
    config.write_text("[services.jobs]\njob_interval = 0.2\n")
    client = redis_server.client()
    client.rpush(f"{mesh_settings.namespace}:stratum:jobs", b"\xc1 not a job")  # skipped, logged
    client.close()
    start_service(JOBS, env={"MESHKIT_CONFIG": str(config)})
    wait_until(lambda: len(stored_jobs_lenient(redis_server, mesh_settings)) >= 1, 10, "a first job")
    [newest] = stored_jobs_lenient(redis_server, mesh_settings)[:1]
    assert newest["clean_jobs"]


def stored_jobs_lenient(redis_server: RedisServer, settings: Settings) -> list[dict[str, Any]]:
    """:func:`stored_jobs`, skipping entries that are not MessagePack maps."""
    client = redis_server.client()
    try:
        out = []
        for raw in client.lrange(f"{settings.namespace}:stratum:jobs", 0, -1):
            try:
                doc = msgpack.unpackb(raw, raw=False)
            except (ValueError, msgpack.UnpackException):
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out
    finally:
        client.close()
