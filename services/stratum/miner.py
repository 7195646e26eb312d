"""A small CPU miner speaking Stratum v1 over TCP: finds real shares at low difficulty.

``python -m services.stratum.miner HOST PORT [--worker W] [--shares N] [--seconds T]``
connects, subscribes, authorizes (and sends ``mining.extranonce.subscribe``),
then searches nonces for the newest job at the difficulty the pool set,
submits every share it finds and counts the answers. It follows
``mining.set_difficulty``, ``mining.notify`` (``clean_jobs`` or not, the
newest job wins), ``mining.set_extranonce`` and ``client.reconnect``, and
stops after ``N`` submitted shares (waiting a few seconds for their
answers) or ``T`` seconds, or when the pool closes the connection, printing
its counts as JSON. It does not retry a failed connection: an error to
connect is raised (``OSError``), a refused session is :class:`MinerError`.

The header is built from the wire strings by :mod:`.mining`, not by
:mod:`.work`, so that a pool and this miner agreeing shows the wire byte
orders are right.

It is a test and demo tool: one connection, one core, about a million
hashes a second (a modern ASIC does a hundred trillion).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from meshkit.untrusted import LogThrottle, clip

from . import messages
from .messages import Method
from .mining import Work, search
from .target import share_target

log = logging.getLogger(__name__)

BATCH = 2048  # nonces per pass before yielding to the event loop (a few ms of hashing)
MAX_WAIT = 5.0  # longest client.reconnect wait honoured, seconds
ANSWER_GRACE = 5.0  # seconds to wait for answers to submitted shares when stopping


@dataclass
class MinerStats:
    """What a run did; ``rejects`` counts rejections by Stratum error code."""

    accepted: int = 0
    rejected: int = 0
    rejects: Counter[int] = field(default_factory=Counter)
    submitted: int = 0
    hashes: int = 0
    jobs: int = 0
    reconnects: int = 0
    difficulty: float = 0.0
    bad_lines: int = 0
    unanswered: int = 0  # submitted shares whose answer never came (connection closed or moved)

    @property
    def answered(self) -> int:
        return self.accepted + self.rejected


class MinerError(Exception):
    """The pool refused the session (subscribe or authorize failed, or it answered nonsense)."""


@dataclass
class _Session:
    """One connection's state: what the pool told us and where we are in the search."""

    host: str
    port: int
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[tuple[Any, Any]]] = field(default_factory=dict)
    next_id: int = 1
    extranonce1: bytes = b""
    extranonce2_size: int = 4
    target: int | None = None
    work: Work | None = None
    extranonce2: int = 0
    nonce: int = 0
    base: bytes = b""
    reconnect: tuple[str, int, float] | None = None
    closed: bool = False  # a write failed: the pool is gone
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class StratumMiner:
    """Mine against one pool until ``max_shares`` shares are answered or ``max_seconds`` pass."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        worker: str = "meshkit.cpu",
        password: str = "x",
        max_shares: int = 10,
        max_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port = host, port
        self.worker, self.password = worker, password
        self.max_shares, self.max_seconds = max_shares, max_seconds
        self.clock = clock
        self.stats = MinerStats()
        self._throttle = LogThrottle(log)
        self._answers: set[asyncio.Task[None]] = set()

    async def run(self) -> MinerStats:
        """Mine, following reconnects, until done; return the counts. Raises :class:`MinerError`."""
        deadline = self.clock() + self.max_seconds
        host, port = self.host, self.port
        while True:
            target = await self._session(host, port, deadline)
            if target is None or self.clock() >= deadline:
                break
            host, port, wait = target
            self.stats.reconnects += 1
            # client.reconnect's own wait: part of the protocol, bounded.
            await asyncio.sleep(min(wait, MAX_WAIT, max(deadline - self.clock(), 0)))
        return self.stats

    def _remaining(self, deadline: float) -> float:
        return max(deadline - self.clock(), 0.0)

    async def _session(self, host: str, port: int, deadline: float) -> tuple[str, int, float] | None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=messages.MAX_LINE), self._remaining(deadline) or 0.001
        )
        s = _Session(host, port, writer)
        reading = asyncio.create_task(self._read(reader, s))
        try:
            await self._handshake(s, deadline)
            await self._mine(s, deadline, reading)
            await self._drain_answers(deadline)
            if reading.done() and not reading.cancelled() and reading.exception() is not None:
                raise MinerError(f"reading from the pool failed: {clip(reading.exception(), 80)}")
            return s.reconnect
        finally:
            reading.cancel()
            for fut in s.pending.values():
                fut.cancel()
            s.pending.clear()
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _call(self, s: _Session, method: Method, params: list[Any]) -> asyncio.Future[tuple[Any, Any]]:
        id, s.next_id = s.next_id, s.next_id + 1
        fut: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
        s.pending[id] = fut
        try:
            s.writer.write(messages.encode(messages.request(id, method, params)))
            await s.writer.drain()
        except (ConnectionError, OSError):
            # The pool went away: this call will not be answered, and no later one either.
            s.closed = True
            s.pending.pop(id, None)
            if not fut.done():  # the reader may have failed it already
                fut.set_exception(MinerError("the pool closed the connection before answering"))
        return fut

    async def _handshake(self, s: _Session, deadline: float) -> None:
        fut = await self._call(s, Method.SUBSCRIBE, ["meshkit-cpuminer/1"])
        result, error = await asyncio.wait_for(fut, self._remaining(deadline) or 0.001)
        try:
            s.extranonce1 = bytes.fromhex(result[1])
            s.extranonce2_size = int(result[2])
        except (TypeError, ValueError, IndexError, KeyError):
            raise MinerError(f"mining.subscribe failed: {clip(error or result, 80)}") from None
        if not 1 <= s.extranonce2_size <= 16:
            raise MinerError(f"extranonce2 size {s.extranonce2_size} is out of range")
        fut = await self._call(s, Method.AUTHORIZE, [self.worker, self.password])
        result, error = await asyncio.wait_for(fut, self._remaining(deadline) or 0.001)
        if result is not True:
            raise MinerError(f"mining.authorize failed: {clip(error, 80)}")
        # Asked for, not awaited: a pool that does not know it answers an error, which is fine.
        fut = await self._call(s, Method.EXTRANONCE_SUBSCRIBE, [])
        fut.add_done_callback(_ignore_outcome)

    async def _mine(self, s: _Session, deadline: float, reading: asyncio.Task[None]) -> None:
        while self.stats.submitted < self.max_shares and self.clock() < deadline and s.reconnect is None:
            if reading.done() or s.closed:
                return  # the pool closed the connection (or sent something fatal)
            if s.work is None or s.target is None:
                s.changed.clear()
                try:
                    await asyncio.wait_for(s.changed.wait(), min(self._remaining(deadline), 1.0) or 0.001)
                except asyncio.TimeoutError:
                    pass
                continue
            if not s.base:
                s.base = s.work.header_base(s.extranonce1, s.extranonce2.to_bytes(s.extranonce2_size, "big"))
            found = search(s.base, s.nonce, BATCH, s.target)
            if found is None:
                self.stats.hashes += BATCH
                s.nonce += BATCH
            else:
                self.stats.hashes += found - s.nonce + 1
                s.nonce = found + 1
                await self._submit(s, s.work, found)
            if s.nonce >= 1 << 32:  # nonce space exhausted: next extranonce2
                s.extranonce2, s.nonce, s.base = s.extranonce2 + 1, 0, b""
            await asyncio.sleep(0)  # let the reader run: a new job or difficulty may be waiting

    async def _submit(self, s: _Session, work: Work, nonce: int) -> None:
        en2 = s.extranonce2.to_bytes(s.extranonce2_size, "big").hex()
        params = [self.worker, work.job_id, en2, work.ntime_hex, f"{nonce:08x}"]  # nonce: big-endian text
        fut = await self._call(s, Method.SUBMIT, params)
        self.stats.submitted += 1
        task = asyncio.create_task(self._count(fut))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _count(self, fut: asyncio.Future[tuple[Any, Any]]) -> None:
        try:
            result, error = await fut
        except MinerError:
            self.stats.unanswered += 1
            return
        except asyncio.CancelledError:
            if not fut.cancelled():
                raise  # this task itself is being cancelled
            self.stats.unanswered += 1  # the session ended with the share unanswered
            return
        if result is True and error is None:
            self.stats.accepted += 1
            return
        self.stats.rejected += 1
        code = error[0] if isinstance(error, list) and error and isinstance(error[0], int) else 20
        self.stats.rejects[code] += 1
        self._throttle.log(f"reject-{code}", logging.INFO, "share rejected: %s", clip(error, 80))

    async def _drain_answers(self, deadline: float) -> None:
        if self._answers:
            await asyncio.wait(set(self._answers), timeout=min(ANSWER_GRACE, self._remaining(deadline) + 1.0))

    async def _read(self, reader: asyncio.StreamReader, s: _Session) -> None:
        try:
            await self._read_lines(reader, s)
        finally:
            # Nothing more will be answered: fail what waits, so that no one waits for the deadline.
            for fut in s.pending.values():
                if not fut.done():
                    fut.set_exception(MinerError("the pool closed the connection before answering"))
            s.pending.clear()
            s.changed.set()

    async def _read_lines(self, reader: asyncio.StreamReader, s: _Session) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # over the line limit: asyncio dropped it; keep reading
                self.stats.bad_lines += 1
                continue
            except (ConnectionError, OSError):
                return  # the pool went away: as good as closed
            if not line:
                return
            try:
                msg = messages.decode(line)
                self._dispatch(s, msg)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                self.stats.bad_lines += 1
                self._throttle.log("bad-line", logging.WARNING, "ignoring a pool line: %s", clip(str(exc), 120))

    def _dispatch(self, s: _Session, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params")
        if method is None:
            id = msg.get("id")
            fut = s.pending.pop(id, None) if isinstance(id, int) else None
            if fut is not None and not fut.done():
                fut.set_result((msg.get("result"), msg.get("error")))
            return
        if not isinstance(params, list):
            raise ValueError(f"{clip(method, 40)} without a params array")
        if method == Method.SET_DIFFICULTY.value:
            difficulty = params[0]
            if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)):
                raise ValueError(f"bad difficulty {clip(difficulty, 40)}")
            s.target = share_target(float(difficulty))  # ValueError for <= 0, inf, nan
            self.stats.difficulty = float(difficulty)
        elif method == Method.NOTIFY.value:
            s.work, s.extranonce2, s.nonce, s.base = Work.from_notify(params), 0, 0, b""
            self.stats.jobs += 1
        elif method == Method.SET_EXTRANONCE.value:
            s.extranonce1, s.extranonce2_size = bytes.fromhex(params[0]), int(params[1])
            if not 1 <= s.extranonce2_size <= 16:
                raise ValueError("extranonce2 size out of range")
            s.extranonce2, s.nonce, s.base = 0, 0, b""
        elif method == Method.RECONNECT.value:
            s.reconnect = _reconnect_target(s, params)
        s.changed.set()


def _ignore_outcome(fut: asyncio.Future[tuple[Any, Any]]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved, so that asyncio does not log it as never retrieved


def _reconnect_target(s: _Session, params: list[Any]) -> tuple[str, int, float]:
    host = params[0] if params and params[0] else s.host
    port = int(params[1]) if len(params) > 1 and params[1] else s.port
    wait = float(params[2]) if len(params) > 2 and params[2] else 0.0
    if not isinstance(host, str) or len(host) > 255 or not 0 < port < 65536 or not math.isfinite(wait):
        raise ValueError("bad client.reconnect target")
    return host, port, max(wait, 0.0)


def main(argv: list[str] | None = None) -> int:
    """The command line: mine, print the counts as JSON, exit 0 if at least one share was accepted."""
    parser = argparse.ArgumentParser(prog="python -m services.stratum.miner", description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--worker", default="meshkit.cpu")
    parser.add_argument("--password", default="x")
    parser.add_argument("--shares", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    miner = StratumMiner(args.host, args.port, worker=args.worker, password=args.password,
                         max_shares=args.shares, max_seconds=args.seconds)
    stats = asyncio.run(miner.run())
    print(json.dumps({**asdict(stats), "rejects": dict(stats.rejects)}))
    return 0 if stats.accepted else 1


if __name__ == "__main__":
    raise SystemExit(main())
