"""Load clients for the restart proof: Stratum v1 miners over TCP that find real shares.

Each :class:`Miner` holds one connection to the public port (through HAProxy
and a gateway speaking the ``stratum`` dialect) and does what a Stratum v1
miner does against the demo pool (``services/mining.py``): ``mining.subscribe``
(extranonce1, extranonce2 size), ``mining.authorize``, then it follows the
``mining.set_difficulty`` and ``mining.notify`` the pool pushes to that
connection. At a steady rate it searches nonces for the newest job with
:func:`services.stratum.mining.search` (a fresh extranonce2 each time, so no
share repeats) until the header hash meets the connection's share target,
and submits the share with ``mining.submit``, without waiting for answers
(requests are pipelined, as a real miner's are). Every third request is a
``mining.stats`` instead, whose answer names the ``mining`` instance that
served it (how the proof sees a new instance take traffic). A submit is
*ok* when the pool answers ``true``; any Stratum error (stale, duplicate,
low difficulty ...) is a *failure*. Everything that happens is counted in
a :class:`Tally`, under the scenario that was running when it happened; a
request counts under the scenario in which it was *sent*.

A miner behaves the way the gateway protocol asks (``docs/gateway.md``): on a
``shutting_down`` notice it stops sending on that connection, opens a new one
at once, and lets the old one deliver its remaining answers until the gateway
closes it. On a ``client.reconnect`` notice (a stopping gateway moving its
clients in waves) it does the same, and closes the old connection itself
once every request sent on it is answered. Any other end of a connection is a *disconnect*; a connection
that HAProxy accepts and closes before the handshake is answered, or that
cannot be made at all, is *refused*.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # services/ (the Stratum core) imports as in production

from meshkit.codes import ErrorCode  # noqa: E402
from services.stratum.mining import Work, search  # noqa: E402
from services.stratum.target import share_target  # noqa: E402

TIMEOUT = -32000
SHUTTING_DOWN = -32008
STATS_EVERY = 3  # every third request asks mining.stats (which names the instance that served it)
SEARCH = 1 << 20  # nonces tried per share at most (at the proof's difficulty a few dozen do)
HANG_SLACK = 2.0  # an answer this much later than the deadline counts as hung
DEADLINE_SLACK = 1.0  # a timeout error must arrive within this of the deadline


@dataclass
class Counts:
    """What happened during one scenario."""

    sent: int = 0
    ok: int = 0
    timeouts: int = 0  # JSON-RPC timeout errors at the deadline (expected only in a gap)
    failed: int = 0  # every other error, early or late timeouts, and unanswered requests
    hung: int = 0  # no answer by deadline + HANG_SLACK
    disconnects: int = 0
    refused: int = 0
    clean_closes: int = 0
    connects: int = 0
    pushes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "ok": self.ok, "timeouts": self.timeouts, "failed": self.failed,
            "hung": self.hung, "disconnects": self.disconnects, "refused": self.refused,
            "clean_closes": self.clean_closes, "connects": self.connects, "pushes": self.pushes,
            "p50_ms": self.percentile(0.50), "p99_ms": self.percentile(0.99),
            "errors": dict(self.errors),
        }


class Tally:
    """Counts per scenario; :attr:`scenario` is the one running now."""

    def __init__(self, request_timeout: float) -> None:
        self.request_timeout = request_timeout
        self.scenario = "setup"
        self.by_scenario: dict[str, Counts] = {}
        self.gap_scenarios: set[str] = set()  # where a timeout at the deadline is not a failure
        self.first_served: dict[str, float] = {}  # backend instance id -> first request's send time
        self.last_push_at: dict[int, float] = {}  # miner number -> monotonic time
        self.moved_at: list[float] = []  # when each client.reconnect notice arrived (monotonic)
        # When each connection was opened (TCP connected through HAProxy): the rate at
        # which clients arrive at the edge, which the handshake's latency would blur.
        self.connected_at: list[float] = []

    def now(self) -> Counts:
        return self.at(self.scenario)

    def at(self, scenario: str) -> Counts:
        counts = self.by_scenario.get(scenario)
        if counts is None:
            counts = self.by_scenario[scenario] = Counts()
        return counts


@dataclass
class _Pending:
    sent_at: float
    scenario: str
    hung: bool = False


class _Session:
    """One TCP connection of a miner."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, _Pending] = {}
        self.handshake: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.gateway = ""
        self.told_to_leave = asyncio.Event()
        self.ended = asyncio.Event()
        self.clean = False  # the gateway said shutting_down before closing
        self.ours = False  # we closed it (the run is over, or the handshake failed)
        self.extranonce1 = b""
        self.en2size = 4
        self.en2 = 0  # the next extranonce2
        self.target: int | None = None  # from the pool's mining.set_difficulty
        self.has_work = asyncio.Event()


def _error_code(error: Any) -> Any:
    """The code of a Stratum error (``[code, message, data]``); a JSON-RPC 2.0 object's too."""
    if isinstance(error, list) and error:
        return error[0]
    return error.get("code") if isinstance(error, dict) else None


def _error_reason(error: Any) -> str:
    """The stable ``data.code`` string of an error if it has one, else its number; a backend's
    refusal with its Stratum number too (``refused:21`` is a stale share)."""
    data = error[2] if isinstance(error, list) and len(error) > 2 else (
        error.get("data") if isinstance(error, dict) else None)
    if isinstance(data, dict) and "code" in data:
        return f"refused:{_error_code(error)}" if data["code"] == ErrorCode.REFUSED else str(data["code"])
    return str(_error_code(error))


class Miner:
    """One simulated client; see the module doc. Run it with :meth:`run` until ``stop`` is set."""

    def __init__(self, number: int, host: str, port: int, tally: Tally, rate: float) -> None:
        self.number = number
        self.host = host
        self.port = port
        self.tally = tally
        self.interval = 1.0 / rate
        self.worker = f"miner{number}.rig"
        self.work: Work | None = None  # the newest mining.notify, decoded
        self.ids = itertools.count(1)
        self.sessions: set[_Session] = set()
        self.gateways: Counter[str] = Counter()  # gateway instance id -> sessions opened there
        self._leaving: set[asyncio.Future[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.sleep(random.random() * self.interval)  # spread the miners' phases
        while not stop.is_set():
            session = await self._connect()
            if session is None:
                await asyncio.sleep(0.2)
                continue
            await self._submit_until(session, stop)
        # Let the last requests be answered before hanging up.
        deadline = time.monotonic() + self.tally.request_timeout + HANG_SLACK
        while any(s.pending for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            await self._close(session)

    async def _connect(self) -> _Session | None:
        tally = self.tally
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
        except (OSError, asyncio.TimeoutError):
            tally.now().refused += 1
            return None
        opened_at = time.monotonic()
        session = _Session(reader, writer)
        self.sessions.add(session)
        reading = asyncio.create_task(self._read(session))
        reading.add_done_callback(lambda _: self.sessions.discard(session))
        try:
            hello = await self._handshake(session, "mesh.hello", [])
            subscribed = await self._handshake(session, "mining.subscribe", [f"meshkit-proof/{self.number}"])
            _, extranonce1, en2size = subscribed["result"]
            session.extranonce1, session.en2size = bytes.fromhex(extranonce1), int(en2size)
            await self._handshake(session, "mining.authorize", [self.worker, "x"])
            # The pool pushes set_difficulty and the current job once authorized.
            await asyncio.wait_for(session.has_work.wait(), self.tally.request_timeout + HANG_SLACK)
        except (ConnectionError, asyncio.TimeoutError, KeyError, ValueError, TypeError):
            if not session.clean:
                tally.now().refused += 1
            await self._close(session)
            return None
        session.gateway = hello["result"]["gateway"]
        self.gateways[session.gateway] += 1
        tally.now().connects += 1
        tally.connected_at.append(opened_at)
        return session

    async def _handshake(self, session: _Session, method: str, params: Any) -> dict[str, Any]:
        rid = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        session.handshake[rid] = future
        self._write(session, {"jsonrpc": "2.0", "method": method, "params": params, "id": rid})
        answer = await asyncio.wait_for(future, self.tally.request_timeout + HANG_SLACK)
        if answer.get("error") is not None or answer.get("result") in (None, False):
            raise KeyError(f"{method} failed: {answer}")
        return answer

    async def _submit_until(self, session: _Session, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not (stop.is_set() or session.told_to_leave.is_set() or session.ended.is_set()):
            self._submit(session)
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < -self.interval:
                next_at = loop.time()  # fell behind (CPU starved): do not burst to catch up
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.told_to_leave.wait(), max(0.0, delay))

    def _submit(self, session: _Session) -> None:
        """Send the next request: a share found for the newest job, or every third time ``mining.stats``."""
        rid = next(self.ids)
        if rid % STATS_EVERY == 0:
            doc: dict[str, Any] = {"id": rid, "method": "mining.stats", "params": []}
        else:
            work, target = self.work, session.target
            if work is None or target is None:
                return  # not possible once connected: the pool pushed both before
            en2 = session.en2.to_bytes(session.en2size, "big")
            session.en2 += 1
            nonce = search(work.header_base(session.extranonce1, en2), 0, SEARCH, target)
            if nonce is None:
                self.tally.now().errors["no_share_found"] += 1
                return
            doc = {"id": rid, "method": "mining.submit",
                   "params": [self.worker, work.job_id, en2.hex(), work.ntime_hex, f"{nonce:08x}"]}
        session.pending[rid] = _Pending(time.monotonic(), self.tally.scenario)
        self.tally.now().sent += 1
        self._write(session, doc)

    def _write(self, session: _Session, doc: dict[str, Any]) -> None:
        if not session.writer.is_closing():
            session.writer.write(json.dumps(doc).encode() + b"\n")

    async def _read(self, session: _Session) -> None:
        try:
            while True:
                line = await session.reader.readline()
                if not line:
                    break
                self._on_line(session, json.loads(line))
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self._ended(session)

    def _on_line(self, session: _Session, doc: dict[str, Any]) -> None:
        tally = self.tally
        method = doc.get("method")
        if method is not None:
            self._on_notification(session, method, doc.get("params"))
            return
        rid = doc.get("id")
        error = doc.get("error")
        if rid is None:
            code = _error_code(error)
            if code == SHUTTING_DOWN:
                session.clean = True
                session.told_to_leave.set()
            else:
                tally.now().errors[f"conn:{code}"] += 1
            return
        future = session.handshake.pop(rid, None)
        if future is not None:
            if not future.done():
                future.set_result(doc)
            return
        pending = session.pending.pop(rid, None)
        if pending is None:
            return
        counts = tally.at(pending.scenario)
        took = time.monotonic() - pending.sent_at
        if pending.hung:
            return  # already counted as hung
        result = doc.get("result")
        if error is None and result not in (None, False):
            counts.ok += 1
            counts.latencies_ms.append(took * 1000)
            served_by = result.get("served_by") if isinstance(result, dict) else None
            if served_by and served_by not in tally.first_served:
                tally.first_served[served_by] = pending.sent_at
            return
        at_deadline = abs(took - tally.request_timeout) <= DEADLINE_SLACK
        if _error_code(error) == TIMEOUT and at_deadline and pending.scenario in tally.gap_scenarios:
            counts.timeouts += 1
        else:
            counts.failed += 1
            counts.errors["rejected" if error is None else _error_reason(error)] += 1

    def _on_notification(self, session: _Session, method: str, params: Any) -> None:
        tally = self.tally
        if method == "mining.notify":
            try:
                self.work = Work.from_notify(params)
            except ValueError:
                tally.now().errors["bad_notify"] += 1
                return
            tally.now().pushes += 1
            tally.last_push_at[self.number] = time.monotonic()
            if session.target is not None:
                session.has_work.set()
        elif method == "mining.set_difficulty":
            try:
                session.target = share_target(float(params[0]))
            except (TypeError, ValueError, IndexError):
                tally.now().errors["bad_difficulty"] += 1
                return
            if self.work is not None:
                session.has_work.set()
        elif method == "client.reconnect" and not session.told_to_leave.is_set():
            tally.moved_at.append(time.monotonic())
            session.clean = True
            session.told_to_leave.set()
            leaving = asyncio.ensure_future(self._leave(session))
            self._leaving.add(leaving)
            leaving.add_done_callback(self._leaving.discard)

    def _ended(self, session: _Session) -> None:
        if session.ended.is_set():
            return
        session.ended.set()
        session.told_to_leave.set()
        for future in session.handshake.values():
            if not future.done():
                future.set_exception(ConnectionResetError("closed during the handshake"))
        counts = self.tally.now()
        if session.clean:
            counts.clean_closes += 1
        elif not session.ours and session.gateway:
            counts.disconnects += 1
        for pending in session.pending.values():
            if not pending.hung:
                self.tally.at(pending.scenario).failed += 1
                self.tally.at(pending.scenario).errors["unanswered_at_close"] += 1
        session.pending.clear()
        if not session.writer.is_closing():
            session.writer.close()

    async def _leave(self, session: _Session) -> None:
        """Close a connection we were asked to leave once its requests are answered (or hung)."""
        deadline = time.monotonic() + self.tally.request_timeout + HANG_SLACK
        while session.pending and not session.ended.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._close(session)

    async def _close(self, session: _Session) -> None:
        session.ours = True
        if not session.writer.is_closing():
            session.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.ended.wait(), 5)

    def sweep_hung(self, now: float) -> None:
        """Count requests with no answer by their deadline plus :data:`HANG_SLACK`."""
        limit = self.tally.request_timeout + HANG_SLACK
        for session in self.sessions:
            for pending in session.pending.values():
                if not pending.hung and now - pending.sent_at > limit:
                    pending.hung = True
                    self.tally.at(pending.scenario).hung += 1


async def probe_connection(host: str, port: int, timeout: float) -> str | None:
    """Open a connection, ask ``mesh.hello``, close; the gateway id, or ``None`` if refused."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(b'{"jsonrpc":"2.0","method":"mesh.hello","id":1}\n')
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            return None
        doc = json.loads(line)
        return str(doc["result"]["gateway"]) if "result" in doc else None
    except (OSError, asyncio.TimeoutError, ValueError, KeyError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Churn:
    """Opens short-lived connections at ``rate`` per second; counts refusals, notes gateways."""

    def __init__(self, host: str, port: int, tally: Tally, rate: float) -> None:
        self.host = host
        self.port = port
        self.tally = tally
        self.rate = rate
        self.landed: list[tuple[float, str]] = []  # (monotonic time opened, gateway id)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 / self.rate)
        if tasks:
            await asyncio.wait(tasks)

    async def _one(self) -> None:
        opened = time.monotonic()
        gateway = await probe_connection(self.host, self.port, 5.0)
        if gateway is None:
            self.tally.now().refused += 1
        else:
            self.landed.append((opened, gateway))
