"""The connection-state Redis pool under a burst: a command waits for a free connection, not fails.

After a gap with no backend, a new instance gets every call the gateways held
at once; each reads its connection's state through :func:`pooled_redis`. The
pool's documented promise is that the command past ``max_connections`` waits
its turn (up to :data:`meshkit.gateway.state.POOL_WAIT` seconds), so a call
whose deadline allows it is answered rather than failed with "No connection
available" (seen in the restart proof's kill-all scenario).
"""

from __future__ import annotations

import asyncio
import time

from meshkit.config import Settings
from meshkit.gateway import pooled_redis
from meshkit.gateway.state import POOL_WAIT


def test_a_command_waits_past_two_seconds_for_a_free_connection(mesh_settings: Settings) -> None:
    hold = 2.6  # longer than the socket timeout (2 s), shorter than the documented wait

    async def main() -> float:
        client = pooled_redis(mesh_settings, max_connections=1)
        try:
            assert await client.ping()  # the pool's one connection exists and is free again
            pool = client.connection_pool
            busy = await pool.get_connection()  # taken: the pool is now full

            async def give_back() -> None:
                await asyncio.sleep(hold)  # the other holder's work, not a readiness wait
                await pool.release(busy)

            started = time.monotonic()
            releaser = asyncio.create_task(give_back())
            assert await client.ping()  # waits for the connection instead of failing
            waited = time.monotonic() - started
            await releaser
            return waited
        finally:
            await client.aclose()

    waited = asyncio.run(main())
    assert hold - 0.1 <= waited < POOL_WAIT
