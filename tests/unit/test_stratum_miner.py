"""The CPU miner against a tiny pool written here, over loopback TCP (port 0), judged by ``shares.judge``.

The pool is in-process and speaks only to 127.0.0.1; no other process or
host is involved. Its verdicts come from the same :class:`JobBook` a real
pool uses, while the miner builds its headers from the wire strings with
its own code: shares accepted here mean both sides agree on every byte
order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.stratum import messages, work
from services.stratum.extranonce import ExtranonceAllocator
from services.stratum.jobbook import JobBook
from services.stratum.messages import Method
from services.stratum.miner import MinerError, StratumMiner
from services.stratum.shares import ShareContext, ShareResult, Verdict
from services.stratum.target import dsha256, hash_value, share_target

DIFF = 2**-20  # one hash in 2**(32-20): ~4,000 hashes a share, a few milliseconds
SCRIPT = bytes.fromhex("51")  # OP_TRUE: any script will do for the pool's payout


def template(height: int = 840000) -> work.BlockTemplate:
    return work.BlockTemplate(
        height=height, prevhash=dsha256(b"tip %d" % height), version=0x20000000, nbits=0x1D00FFFF,
        ntime=int(time.time()), coinbase_value=312_500_000, payout_script=SCRIPT,
        txids=tuple(dsha256(bytes([i])) for i in range(6)),
    )


@dataclass
class Conn:
    """One miner connection as the fake pool sees it."""

    writer: asyncio.StreamWriter
    extranonce1: bytes
    subscribed: bool = False
    authorized: set[str] = field(default_factory=set)

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(messages.encode(message))
        await self.writer.drain()


Hook = Callable[["FakePool", Conn, ShareResult], Awaitable[None]]


class FakePool:
    """Just enough of a Stratum pool: one job book, extranonce1 per connection, shares judged for real."""

    def __init__(self, *, told: float = DIFF, judged: float | None = None, on_share: Hook | None = None,
                 refuse_workers: bool = False, garbage_first: bool = False) -> None:
        self.book = JobBook()
        self.book.add(work.make_job(template(), "j1", extranonce_size=8))
        self.alloc = ExtranonceAllocator(0x0A0B)
        self.told, self.judged = told, judged if judged is not None else told
        self.on_share, self.refuse_workers, self.garbage_first = on_share, refuse_workers, garbage_first
        self.verdicts: Counter[Verdict] = Counter()
        self.log: list[tuple[str, Verdict]] = []  # (job id, verdict) of every share, in order
        self.conns: list[Conn] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakePool:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.writer.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def announce(self, job: work.Job) -> None:
        self.book.add(job)
        for conn in self.conns:
            await conn.send(messages.notify(job))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer, self.alloc.allocate())
        self.conns.append(conn)
        try:
            while line := await reader.readline():
                await self._handle(conn, messages.decode(line))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.alloc.release(conn.extranonce1)

    async def _handle(self, conn: Conn, msg: dict[str, Any]) -> None:
        id, method, params = msg["id"], msg["method"], msg["params"]
        if method == Method.SUBSCRIBE.value:
            conn.subscribed = True
            await conn.send(messages.result(id, messages.subscribe_result("s1", conn.extranonce1, 4)))
            if self.garbage_first:
                conn.writer.write(b"this is not json\n" + b"[" * (messages.MAX_LINE + 10) + b"\n")
            await conn.send(messages.set_difficulty(self.told))
            current = self.book.current
            assert current is not None
            await conn.send(messages.notify(current))
        elif method == Method.AUTHORIZE.value:
            if self.refuse_workers:
                await conn.send(messages.error(id, 24, "Unauthorized worker"))
            else:
                conn.authorized.add(params[0])
                await conn.send(messages.result(id, True))
        elif method == Method.EXTRANONCE_SUBSCRIBE.value:
            await conn.send(messages.result(id, True))
        elif method == Method.SUBMIT.value:
            ctx = ShareContext(conn.extranonce1, 4, self.judged, conn.subscribed, conn.authorized)
            share = self.book.judge(params, ctx, now=time.time())
            self.verdicts[share.verdict] += 1
            self.log.append((str(params[1]), share.verdict))
            if share.verdict.ok:  # the validator's own word, checked once more from the header
                assert hash_value(dsha256(share.header)) <= share_target(self.judged)
            await conn.send(messages.share_answer(id, share))
            if self.on_share is not None:
                await self.on_share(self, conn, share)


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 60)  # a generous bound for a noisy machine

    return asyncio.run(bounded())


def test_the_miner_finds_shares_the_pool_accepts() -> None:
    async def main() -> None:
        async with FakePool() as pool:
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=5, max_seconds=50).run()
        assert (stats.accepted, stats.rejected, stats.submitted) == (5, 0, 5)
        assert pool.verdicts == Counter({Verdict.ACCEPTED: 5})
        assert stats.difficulty == DIFF and stats.jobs == 1 and stats.hashes > 0

    run(main())


def test_the_miner_follows_a_clean_new_job() -> None:
    async def new_job_after_two(pool: FakePool, conn: Conn, share: ShareResult) -> None:
        if pool.verdicts[Verdict.ACCEPTED] == 2 and pool.book.current and pool.book.current.job_id == "j1":
            await pool.announce(work.make_job(template(840001), "j2", extranonce_size=8, clean_jobs=True))

    async def main() -> None:
        # 40 shares: far more hashing than it takes the miner to read j2 at its next yield.
        async with FakePool(on_share=new_job_after_two) as pool:
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=40, max_seconds=50).run()
        assert stats.jobs == 2
        # Shares for j1 submitted before the miner read j2 are stale; once it has, only j2 is mined.
        jobs = [job_id for job_id, _ in pool.log]
        first_j2 = jobs.index("j2")
        assert set(jobs[first_j2:]) == {"j2"} and len(jobs) == 40
        assert {v for job_id, v in pool.log if job_id == "j2"} == {Verdict.ACCEPTED}
        assert {v for job_id, v in pool.log[2:first_j2]} <= {Verdict.STALE}
        assert stats.accepted == pool.verdicts[Verdict.ACCEPTED]
        assert stats.rejects == Counter({21: pool.verdicts[Verdict.STALE]} if stats.rejected else {})

    run(main())


def test_rejections_are_counted_by_code() -> None:
    async def main() -> None:
        # The pool asks for 2**-20 but judges at 2**-17: about seven shares in eight are too weak.
        async with FakePool(told=DIFF, judged=2**-17) as pool:
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=12, max_seconds=50).run()
        assert stats.submitted == 12 and stats.answered == 12
        assert stats.rejects[23] == pool.verdicts[Verdict.LOW_DIFFICULTY] > 0
        assert stats.accepted == pool.verdicts[Verdict.ACCEPTED]

    run(main())


def test_the_miner_follows_client_reconnect() -> None:
    async def main() -> None:
        async with FakePool() as second:
            async def send_away(pool: FakePool, conn: Conn, share: ShareResult) -> None:
                if pool.verdicts.total() == 1:
                    await conn.send(messages.reconnect("127.0.0.1", second.port, 0))

            # 40 shares take ~150,000 hashes: far longer than reading one line at the next yield.
            async with FakePool(on_share=send_away) as first:
                stats = await StratumMiner("127.0.0.1", first.port, max_shares=40, max_seconds=50).run()
        assert stats.reconnects == 1
        # Shares already on their way when client.reconnect came still count at the first pool.
        assert set(first.verdicts) == {Verdict.ACCEPTED} and set(second.verdicts) == {Verdict.ACCEPTED}
        assert stats.accepted == first.verdicts.total() + second.verdicts.total() == 40

    run(main())


def test_the_miner_uses_a_new_extranonce1() -> None:
    async def main() -> None:
        async with FakePool() as pool:
            original = pool._handle

            async def with_new_extranonce(conn: Conn, msg: dict[str, Any]) -> None:
                if msg["method"] == Method.EXTRANONCE_SUBSCRIBE.value:
                    conn.extranonce1 = bytes.fromhex("0a0bffff")  # the pool now judges with this one
                    await conn.send(messages.set_extranonce(conn.extranonce1, 4))
                await original(conn, msg)

            pool._handle = with_new_extranonce  # type: ignore[method-assign]
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=20, max_seconds=50).run()
        # Shares found before the miner read set_extranonce are judged with the new extranonce1 and
        # fail; every one after it passes.
        verdicts = [v for _, v in pool.log]
        first_ok = verdicts.index(Verdict.ACCEPTED)
        assert set(verdicts[:first_ok]) <= {Verdict.LOW_DIFFICULTY} and set(verdicts[first_ok:]) == {Verdict.ACCEPTED}
        assert stats.accepted == pool.verdicts[Verdict.ACCEPTED]

    run(main())


def test_garbage_from_the_pool_is_skipped() -> None:
    async def main() -> None:
        async with FakePool(garbage_first=True) as pool:
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=2, max_seconds=50).run()
        assert stats.bad_lines == 2 and stats.accepted == 2

    run(main())


def test_an_unauthorized_worker_stops_the_miner_with_a_clear_error() -> None:
    async def main() -> None:
        async with FakePool(refuse_workers=True) as pool:
            with pytest.raises(MinerError, match=r"mining\.authorize failed.*Unauthorized worker"):
                await StratumMiner("127.0.0.1", pool.port, max_shares=2, max_seconds=50).run()

    run(main())


def test_the_miner_stops_after_its_time_without_work() -> None:
    async def main() -> None:
        async with FakePool(told=DIFF) as pool:
            pool.book = JobBook()  # no job at all: the pool only subscribes and authorizes
            original = pool._handle

            async def no_notify(conn: Conn, msg: dict[str, Any]) -> None:
                if msg["method"] == Method.SUBSCRIBE.value:
                    await conn.send(messages.result(msg["id"], messages.subscribe_result("s", conn.extranonce1, 4)))
                    return
                await original(conn, msg)

            pool._handle = no_notify  # type: ignore[method-assign]
            started = time.monotonic()
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=2, max_seconds=0.5).run()
            assert time.monotonic() - started < 10
        assert stats.submitted == 0 and stats.jobs == 0

    run(main())


def test_a_pool_that_hangs_up_mid_handshake_is_a_clear_error_at_once() -> None:
    async def main() -> None:
        async with FakePool() as pool:
            async def hang_up(conn: Conn, msg: dict[str, Any]) -> None:
                conn.writer.close()

            pool._handle = hang_up  # type: ignore[method-assign]
            started = time.monotonic()
            with pytest.raises(MinerError, match="closed the connection before answering"):
                await StratumMiner("127.0.0.1", pool.port, max_shares=2, max_seconds=50).run()
            assert time.monotonic() - started < 10  # not the 50 s deadline

    run(main())


def test_shares_unanswered_when_the_pool_goes_away_are_counted() -> None:
    async def main() -> None:
        async with FakePool() as pool:
            original = pool._handle

            async def silent_then_gone(conn: Conn, msg: dict[str, Any]) -> None:
                if msg["method"] != Method.SUBMIT.value:
                    await original(conn, msg)
                elif not pool.log:
                    pool.log.append(("j1", Verdict.ACCEPTED))  # seen, never answered
                    conn.writer.close()

            pool._handle = silent_then_gone  # type: ignore[method-assign]
            stats = await StratumMiner("127.0.0.1", pool.port, max_shares=50, max_seconds=50).run()
        assert stats.answered == 0 and stats.unanswered == stats.submitted >= 1

    run(main())
