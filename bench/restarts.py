"""The restart proof: client connections survive everything done to the services behind them.

Usage (from the project root)::

    .venv/bin/python bench/restarts.py            # a table
    .venv/bin/python bench/restarts.py --json     # one JSON object on stdout

It starts the demo Stratum v1 pool (``docs/stratum.md``): a private
``redis-server``, 3 ``mining`` backends (``services/mining.py``), the ``jobs``
announcer (``services/pooljobs.py``), 2 gateways speaking the ``stratum``
dialect and ``meshkit haproxy sync`` (which runs HAProxy) on a public socket
this process binds on ``127.0.0.1:0`` and hands over as a file descriptor
(:mod:`proofstack`). Then ``--clients`` CPU miners (:mod:`loadclients`)
connect through HAProxy: each subscribes and authorizes, gets its difficulty
and jobs pushed (a ``mining.notify`` every ``--job-interval`` seconds), and
sends ``--rate`` requests per second, real shares it found
(``mining.submit``, judged by the pool for real) and every third one a
``mining.stats``, while these scenarios run one after the other:

``a_rolling_restart``   every backend (mining, then jobs) stopped with SIGTERM and
                        started again, one at a time
``b_kill_all``          every backend killed with SIGKILL at once, ``--gap`` seconds
                        with none, then all started again
``c_scale``             mining scaled 3 -> 6 -> 2 (SIGTERM). ``first_traffic_s`` is the
                        longest, over the new instances, of the time from when this
                        process saw that instance registered (polling every 50 ms,
                        each instance timed as it appears) to the first request it
                        served (a ``mining.stats`` answer names its instance; 0 if
                        it served one first); it must be <= 1 s
``d_haproxy_reload``    ``--reloads`` HAProxy reloads, with new connections opening
                        throughout (``--churn`` per second)
``e_gateway_drain``     one gateway stopped with SIGTERM: new connections must go to
                        the other; its clients keep working until it asks them to
                        move (``client.reconnect``, in waves), and they leave cleanly
``f_meshkit_restart``   the backends move under circusd (``--backends`` processes of a
                        ``mining`` watcher; the proof's own leave with SIGTERM), then
                        ``meshkit restart mining`` replaces them one at a time. The
                        registry is polled every 50 ms throughout: every process must
                        be replaced, the number of ``up`` mining instances must never
                        drop below ``--backends``, and each old process must leave only
                        after a replacement registered (``min_up``, ``order_ok``)
``g_gateway_rolling``   ``--rolling-clients`` more clients join (2,000 in all), then every
                        gateway is replaced one at a time (a new one routed by HAProxy,
                        then the old one stopped with SIGTERM). Each stopping gateway
                        tells its clients ``client.reconnect`` in waves over
                        ``--reconnect-window`` s, at most ``--reconnect-rate`` a second;
                        the clients honour it (stop sending there, collect their answers,
                        reconnect through HAProxy). Checks: nothing failed or lost, every
                        client moved, and no second (sliding) saw more notices or
                        reconnections than the rate plus one wave (a quarter second's
                        worth) of slack for an event loop that read a wave late
                        (``moved_per_s_max``, ``reconnects_per_s_max``)

Per scenario it counts requests sent, answered, failed, hung and timed out,
client disconnects, refused connections, clean closes and pushes, and the
latency p50/p99 of answered requests. A request counts under the scenario in
which it was sent. Timeouts are failures except in ``b_kill_all``, where a
request sent during the gap may time out, but only at its deadline.
The run passes when ``client_disconnects``, ``failed_requests``,
``hung_requests`` and ``refused_connections`` are all 0 and every
scenario-specific check holds (``checks`` in the JSON). Exit status 0 on
pass, 1 on fail. ``tests/integration/test_restarts.py`` runs the same code,
scaled down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadclients import HANG_SLACK, Churn, Miner, Tally
from proofstack import BACKEND, GATEWAY, JOBS, MINING, ProofConfig, Stack

from meshkit.testing import ProcessExitedError, ServiceProcess, read_records

SCENARIOS = ("a_rolling_restart", "b_kill_all", "c_scale", "d_haproxy_reload", "e_gateway_drain",
             "f_meshkit_restart", "g_gateway_rolling")


class Proof:
    """Runs the load and the scenarios against a started :class:`Stack`."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.config = stack.config
        self.tally = Tally(self.config.request_timeout)
        host, port = stack.address
        self.miners = [Miner(n, host, port, self.tally, self.config.rate)
                       for n in range(self.config.clients)]
        self.extra: dict[str, dict[str, Any]] = {name: {} for name in SCENARIOS}
        self.checks: dict[str, bool] = {}
        self.started = 0.0
        self.loadavg_start = os.getloadavg()

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        stop = asyncio.Event()
        self.tally.scenario = "baseline"
        miners = [asyncio.create_task(m.run(stop)) for m in self.miners]
        watchdog = asyncio.create_task(self._watch_hung())
        try:
            await self._wait_connected()
            self.started = time.monotonic()
            await asyncio.sleep(cfg.settle)
            for name in SCENARIOS:
                self.tally.scenario = name
                await getattr(self, name)()
                await asyncio.sleep(cfg.settle)
            self.tally.scenario = "teardown"
        finally:
            stop.set()
            await asyncio.gather(*miners, return_exceptions=True)
            watchdog.cancel()
        for miner in self.miners:
            miner.sweep_hung(time.monotonic() + 3600)  # anything still unanswered is hung
        return self.report()

    async def _wait_connected(self) -> None:
        deadline = time.monotonic() + 30
        while sum(c.connects for c in self.tally.by_scenario.values()) < len(self.miners):
            if time.monotonic() > deadline:
                raise TimeoutError("the miners did not all connect within 30 s")
            await asyncio.sleep(0.1)

    async def _watch_hung(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for miner in self.miners:
                miner.sweep_hung(now)

    # -- the scenarios ----------------------------------------------------------------

    async def a_rolling_restart(self) -> None:
        stack = self.stack
        exits = []
        for i, old in enumerate(list(stack.backends)):
            exits.append(await asyncio.to_thread(old.terminate))
            stack.backends[i] = await asyncio.to_thread(lambda: stack.start_many(MINING, 1)[0])
        assert stack.jobs is not None
        exits.append(await asyncio.to_thread(stack.jobs.terminate))
        stack.jobs = await asyncio.to_thread(lambda: stack.start_many(JOBS, 1)[0])
        self.extra["a_rolling_restart"]["restarted"] = len(exits)
        self.checks["a_backends_exit_0"] = all(code == 0 for code in exits)

    async def b_kill_all(self) -> None:
        stack, cfg = self.stack, self.config
        self.tally.gap_scenarios.add("b_kill_all")
        assert stack.jobs is not None
        victims = [*stack.backends, stack.jobs]
        for proc in victims:
            proc.kill()
        await asyncio.sleep(cfg.gap)
        count = len(stack.backends)
        restarted_at = time.monotonic()
        stack.jobs, *stack.backends = await asyncio.to_thread(
            lambda: [stack.spawn(JOBS), *[stack.spawn(MINING) for _ in range(count)]])
        for proc in [stack.jobs, *stack.backends]:
            await asyncio.to_thread(proc.wait_registered, 30)
        back_at = time.monotonic()
        # Pushes resume: every connected miner hears of a new job.
        deadline = back_at + 3 * cfg.job_interval + 5
        while time.monotonic() < deadline and not self._all_pushed_since(back_at):
            await asyncio.sleep(0.1)
        resumed = self._all_pushed_since(back_at)
        info = self.extra["b_kill_all"]
        info["gap_s"] = round(back_at - restarted_at + cfg.gap, 2)
        info["pushes_resumed_s"] = round(time.monotonic() - back_at, 2) if resumed else None
        self.checks["b_pushes_resumed"] = resumed
        # Every request of the gap is resolved by now or counts as hung.
        await asyncio.sleep(cfg.request_timeout + HANG_SLACK)

    def _all_pushed_since(self, since: float) -> bool:
        return all(self.tally.last_push_at.get(m.number, 0.0) > since for m in self.miners)

    async def c_scale(self) -> None:
        stack, cfg = self.stack, self.config
        count = max(0, cfg.scale_up_to - len(stack.backends))
        added = await asyncio.to_thread(lambda: [stack.spawn(MINING) for _ in range(count)])
        registered = await self._registration_times(added, timeout=30)
        stack.backends.extend(added)
        await asyncio.sleep(max(1.5, cfg.settle))  # the window in which each must take traffic
        # Negative when a request waiting in a gateway was its first: that counts as 0.
        delays = {iid: self.tally.first_served.get(iid, float("inf")) - at
                  for iid, at in registered.items()}
        info = self.extra["c_scale"]
        info["scaled_up_to"] = len(stack.backends)
        info["first_traffic_s"] = None
        if delays:  # none when scale_up_to is not above the backends running
            worst = max(delays.values())
            if worst != float("inf"):
                info["first_traffic_s"] = round(max(0.0, worst), 3)
            self.checks["c_new_instances_take_traffic_within_1s"] = worst <= 1.0
        # Scale down: the oldest go, with SIGTERM, all at once.
        leaving = stack.backends[:len(stack.backends) - cfg.scale_down_to]
        stack.backends = stack.backends[len(leaving):]
        exits = await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in leaving))
        info["scaled_down_to"] = len(stack.backends)
        self.checks["c_removed_exit_0"] = all(code == 0 for code in exits)

    async def _registration_times(self, procs: list[ServiceProcess], timeout: float) -> dict[str, float]:
        """Instance id -> when this process first saw it registered ``up``, for each of ``procs``.

        Polls the registry every 50 ms and times each instance as it appears
        (with the time the poll began, never later than the registration), so
        an instance that registered early is not credited with the wait for
        the last one. Fills in each ``record``. Raises ``TimeoutError`` after
        ``timeout`` s, :class:`ProcessExitedError` if one exits.
        """
        settings = self.stack.settings
        assert settings is not None
        waiting = {proc.pid: proc for proc in procs}
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while True:
            polled_at = time.monotonic()
            for rec in await asyncio.to_thread(read_records, settings, BACKEND):
                proc = waiting.pop(rec.pid, None) if rec.is_up else None
                if proc is not None:
                    proc.record = rec
                    seen[rec.instance_id] = polled_at
            if not waiting:
                return seen
            for proc in waiting.values():
                if not proc.running():
                    raise ProcessExitedError(f"{proc.target} exited: {proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} new instances did not register within {timeout}s")
            await asyncio.sleep(0.05)

    async def d_haproxy_reload(self) -> None:
        cfg = self.config
        churn = Churn(*self.stack.address, self.tally, cfg.churn)
        stop = asyncio.Event()
        running = asyncio.create_task(churn.run(stop))
        await asyncio.sleep(0.5)
        for _ in range(cfg.reloads):
            await asyncio.to_thread(self.stack.reload_haproxy)
            await asyncio.sleep(1.0)
        stop.set()
        await running
        self.extra["d_haproxy_reload"].update(reloads=cfg.reloads, new_connections=len(churn.landed))

    async def e_gateway_drain(self) -> None:
        stack, cfg = self.stack, self.config
        leaving = stack.gateways[0]
        assert leaving.record is not None and leaving.process is not None
        gone_id = leaving.record.instance_id
        held = sum(1 for m in self.miners for s in m.sessions if s.gateway == gone_id)
        churn = Churn(*stack.address, self.tally, cfg.churn)
        stop = asyncio.Event()
        running = asyncio.create_task(churn.run(stop))
        signalled = time.monotonic()
        leaving.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(leaving.process.wait, cfg.gateway_grace + 30)
        stack.gateways.remove(leaving)
        stop.set()
        await running
        # HAProxy hears of the drain through the registry within milliseconds;
        # 0.5 s is the allowance for that, not for the gateway.
        misrouted = [g for at, g in churn.landed if g == gone_id and at > signalled + 0.5]
        counts = self.tally.at("e_gateway_drain")
        info = self.extra["e_gateway_drain"]
        info.update(exit_code=code, clients_on_stopped_gateway=held,
                    drain_s=round(time.monotonic() - signalled, 2),
                    new_connections=len(churn.landed), misrouted_new_connections=len(misrouted))
        self.checks["e_gateway_exit_0"] = code == 0
        self.checks["e_no_new_connections_to_draining_gateway"] = not misrouted
        self.checks["e_clients_closed_cleanly"] = counts.clean_closes >= held and held > 0

    async def f_meshkit_restart(self) -> None:
        stack, cfg = self.stack, self.config
        circus = await asyncio.to_thread(stack.start_circus_mining, cfg.backends)
        leaving, stack.backends = stack.backends, []
        await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in leaving))
        old = set(await asyncio.to_thread(circus.control.pids, BACKEND))
        timeline: list[tuple[float, set[int]]] = []
        done = asyncio.Event()
        polling = asyncio.create_task(self._poll_up_backends(timeline, done))
        started = time.monotonic()
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "meshkit", "restart", BACKEND, "--run-dir",
                             str(circus.run_dir)],
            env=stack.child_env(), capture_output=True, text=True, timeout=300)
        took = time.monotonic() - started
        done.set()
        await polling
        new = set(await asyncio.to_thread(circus.control.pids, BACKEND))
        up_counts = [len(pids) for _, pids in timeline]
        info = self.extra["f_meshkit_restart"]
        info.update(exit_code=result.returncode, replaced=len(old - new), restart_s=round(took, 2),
                    min_up=min(up_counts) if up_counts else None, order_ok=_replaced_in_order(timeline, old))
        if result.returncode != 0:
            info["stderr"] = result.stderr[-500:]
        self.checks["f_restart_exit_0"] = result.returncode == 0
        self.checks["f_every_process_replaced"] = not (old & new) and len(new) == cfg.backends
        self.checks["f_never_fewer_up"] = bool(up_counts) and min(up_counts) >= cfg.backends
        self.checks["f_registered_before_stopped"] = bool(info["order_ok"])

    async def g_gateway_rolling(self) -> None:
        """Every gateway replaced, one at a time, under ``rolling_clients`` more clients."""
        stack, cfg = self.stack, self.config
        host, port = stack.address
        while len(stack.gateways) < cfg.gateways:  # e_gateway_drain stopped one
            added = await asyncio.to_thread(lambda: stack.start_many(GATEWAY, 1)[0])
            await asyncio.to_thread(stack.wait_routed, added)
            stack.gateways.append(added)
        first = len(self.miners)
        extra = [Miner(first + n, host, port, self.tally, cfg.rolling_rate) for n in range(cfg.rolling_clients)]
        stop = asyncio.Event()
        running = [asyncio.create_task(m.run(stop)) for m in extra]
        wanted = len(self.tally.connected_at) + len(extra)
        deadline = time.monotonic() + 60
        while len(self.tally.connected_at) < wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        joined = len(self.tally.connected_at) >= wanted
        await asyncio.sleep(cfg.settle)
        started = time.monotonic()
        exits = []
        for old in list(stack.gateways):
            new = await asyncio.to_thread(lambda: stack.start_many(GATEWAY, 1)[0])
            await asyncio.to_thread(stack.wait_routed, new)
            assert old.process is not None
            old.process.send_signal(signal.SIGTERM)
            exits.append(await asyncio.to_thread(old.process.wait, cfg.gateway_grace + 30))
            stack.gateways[stack.gateways.index(old)] = new
        took = time.monotonic() - started
        await asyncio.sleep(cfg.settle)
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        self.miners.extend(extra)  # their hung requests are swept with the others'
        moved = [t for t in self.tally.moved_at if t >= started]
        reconnects = [t for t in self.tally.connected_at if started <= t <= started + took]
        peak_moved, peak_reconnects = _peak(moved), _peak(reconnects)
        # One wave of slack: a wave the clients' event loop read late shares a second with the next.
        allowed = cfg.reconnect_rate + max(1.0, cfg.reconnect_rate * 0.25)
        info = self.extra["g_gateway_rolling"]
        info.update(clients=len(self.miners), restarted=len(exits), restart_s=round(took, 2),
                    moved=len(moved), reconnects=len(reconnects), moved_per_s_max=peak_moved,
                    reconnects_per_s_max=peak_reconnects, reconnect_rate=cfg.reconnect_rate)
        self.checks["g_all_clients_joined"] = joined
        self.checks["g_gateways_exit_0"] = bool(exits) and all(code == 0 for code in exits)
        self.checks["g_every_client_moved"] = len(moved) >= len(self.miners)
        self.checks["g_reconnects_within_rate"] = bool(moved) and max(peak_moved, peak_reconnects) <= allowed

    async def _poll_up_backends(self, timeline: list[tuple[float, set[int]]], done: asyncio.Event) -> None:
        """Append (time, pids of ``up`` mining records) every 50 ms until ``done`` (and once after)."""
        settings = self.stack.settings
        assert settings is not None
        while True:
            finished = done.is_set()
            records = await asyncio.to_thread(read_records, settings, BACKEND)
            timeline.append((time.monotonic(), {r.pid for r in records if r.is_up}))
            if finished:
                return
            await asyncio.sleep(0.05)

    # -- the report -----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        by = self.tally.by_scenario
        totals = {k: sum(getattr(c, k) for c in by.values())
                  for k in ("sent", "ok", "timeouts", "failed", "hung", "disconnects", "refused",
                            "clean_closes", "pushes")}
        baseline = by.get("baseline")
        scenarios: dict[str, Any] = {}
        for name in ("baseline", *SCENARIOS, "teardown"):
            if name in by:
                scenarios[name] = {**by[name].summary(), **self.extra.get(name, {})}
        for name in SCENARIOS:
            c = by.get(name)
            self.checks[f"{name}_zero_counts"] = c is not None and c.sent > 0 and not (
                c.disconnects or c.failed or c.hung or c.refused)
        elapsed = time.monotonic() - self.started if self.started else 0.0
        result = {
            "config": asdict(self.config),
            "client_disconnects": totals["disconnects"],
            "failed_requests": totals["failed"],
            "hung_requests": totals["hung"],
            "refused_connections": totals["refused"],
            "requests": totals["sent"],
            "answered": totals["ok"],
            "gap_timeouts": totals["timeouts"],
            "pushes": totals["pushes"],
            "request_rate_per_s": round(totals["sent"] / elapsed, 1) if elapsed else None,
            "baseline_p50_ms": baseline.percentile(0.5) if baseline else None,
            "baseline_p99_ms": baseline.percentile(0.99) if baseline else None,
            "scenarios": scenarios,
            "checks": self.checks,
            "machine": {"cpus": os.cpu_count(), "loadavg_start": self.loadavg_start[0],
                        "loadavg_end": os.getloadavg()[0]},
        }
        result["passed"] = (not (totals["disconnects"] or totals["failed"] or totals["hung"]
                                 or totals["refused"]) and all(self.checks.values()))
        return result


def _peak(times: list[float]) -> int:
    """The most of ``times`` within any one second (sliding, half-open)."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def _replaced_in_order(timeline: list[tuple[float, set[int]]], old: set[int]) -> bool:
    """Whether, in the polled registry, every old process left only after more new ones had
    registered than old ones had left (so each replacement came before its stop)."""
    left: set[int] = set()
    for _, pids in timeline:
        left |= old - pids
        if left and len(pids - old) < len(left):
            return False
    return left == old


def run_proof(config: ProofConfig, workdir: str | None = None) -> dict[str, Any]:
    """Start the stack, run every scenario under load, tear down; return the report."""
    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="meshkit-proof-"))
        Path(workdir).mkdir(parents=True, exist_ok=True)  # --workdir may name a folder not made yet
        stack = Stack(config, Path(workdir))
        cleanup.callback(stack.stop)
        stack.start()
        return asyncio.run(Proof(stack).run())


def format_table(report: dict[str, Any]) -> str:
    columns = ("sent", "ok", "failed", "hung", "timeouts", "disconnects", "refused",
               "clean_closes", "pushes", "p50_ms", "p99_ms")
    rows = [("scenario", *columns)]
    for name, s in report["scenarios"].items():
        rows.append((name, *(str(s[c]) if s[c] is not None else "-" for c in columns)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w)
                       for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.append("")
    for key in ("client_disconnects", "failed_requests", "hung_requests", "refused_connections",
                "requests", "request_rate_per_s", "gap_timeouts", "machine"):
        lines.append(f"{key:22} {report[key]}")
    for name in SCENARIOS:
        extra = {k: v for k, v in report["scenarios"].get(name, {}).items()
                 if k not in columns and k not in ("errors", "connects")}
        if extra:
            lines.append(f"{name:22} {json.dumps(extra)}")
    for name, s in report["scenarios"].items():
        if s.get("errors"):
            lines.append(f"{name:22} errors {json.dumps(s['errors'])}")
    for check, ok in report["checks"].items():
        lines.append(f"{'PASS' if ok else 'FAIL'}  {check}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def raise_file_limit() -> int:
    """Raise this process's soft file-descriptor limit to the hard one (children inherit it).

    2,000 clients hold 2,000 sockets here, and HAProxy two per connection.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(argv: list[str] | None = None) -> int:
    raise_file_limit()
    defaults = ProofConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--workdir", help="keep logs here (default: a temporary directory)")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    config = ProofConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    report = run_proof(config, args.workdir)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
