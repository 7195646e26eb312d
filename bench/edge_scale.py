"""The edge at scale: N (10,000) connected clients through HAProxy to two gateways on one machine.

Usage (from the project root)::

    .venv/bin/python bench/edge.py --scale 10000          # a table
    .venv/bin/python bench/edge.py --scale 10000 --json   # one JSON object on stdout
    .venv/bin/python bench/edge_scale.py --clients 600    # the same code, directly

Why two HAProxy processes. HAProxy holds two descriptors per proxied
connection (client side and server side), so one process needs about 20,000
for 10,000 connections. This container's hard ``RLIMIT_NOFILE`` is 20,000
and cannot be raised (no ``CAP_SYS_RESOURCE``): one HAProxy tops out below
10,000. So :class:`ScaleStack` runs ``--proxies`` (2) ``meshkit haproxy
sync`` processes, each with its own HAProxy and run directory, on sockets
bound here to **the same port** with ``SO_REUSEPORT``; the kernel spreads
new connections across the listening sockets (by a hash of the 4-tuple), so
each HAProxy holds about half and stays inside the limit. This is a real
deployment shape (several HAProxy processes on one port, as ``nbproc`` did,
or one per NUMA node), and each process health-checks both gateways on its
own. The open-file limit of this process (inherited by every child) is
raised from the soft to the hard limit first (``setrlimit``), and each
HAProxy's ``maxconn`` is derived from it.

The clients are ``--client-procs`` (10) processes of :mod:`edge_clients`
(role ``hold``), 1,000 connections each. They are all started first and
given ``--spawn-time`` (5 s) to import, so that ten Python start-ups do not
land on the gateways' first seconds; then the **ramp is paced**: all
processes together open ``--ramp-rate`` (400) connections a second, each
one subscribing to ``bench.tick`` at once. Throughout (ramp and push
phase) this process samples, every ``--sample`` (0.25) s, the CPU of every
process group (``haproxy``, ``gateways``, ``backends``, ``redis``,
``clients``), the time a fresh connection takes to get a ``mesh.ping``
answered by each gateway directly (what HAProxy's ``jsonrpc`` health check
does, with a 300 ms timeout), and the time each gateway's registry record
has left to live (its heartbeat's lateness). That is what shows what starves
the checks. HAProxy's own verdicts are read from its stderr (``haproxy.log``
in each run directory: ``Server ... is DOWN``, with the server's sessions
then, so a verdict can be placed in the ramp or after it); ``--series`` puts
every sample in the JSON. The processes and probes are in
:mod:`edge_scale_stack`. ``--check-timeout`` and ``--check-fall`` run HAProxy with
other check settings than the shipped ones (300 ms, 2), to try what a large
gateway needs.

Once every client is connected: memory per connection (RSS of each group
with N connected minus before, over N; and the kernel's TCP memory from
``/proc/net/sockstat``), then ``--requesters`` (1,000) of the connections
each send ``echo.echo`` at ``--request-rate`` (1) a second while this process
publishes ``--publishes`` (20) pushes on ``bench.tick``, one every
``--push-every`` (1) s, each timed until the last client has it. Pass:
every connection made, no error, no disconnect, no push lost, every request
answered (``passed``; exit status 0, else 1). It is a benchmark: it prints
figures; ``passed`` says whether the run was clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_clients import percentiles
from edge_scale_stack import ScaleStack, fd_counts, ping_time, reuseport_sockets, sockstat_tcp
from edge_stack import TOPIC, ClientProc, Groups, cpu_of, default_config, raise_open_files, rss_of

import meshkit
from meshkit.gateway import pooled_redis
from meshkit.keys import Keys
from meshkit.testing import settings_env

__all__ = ["ScaleRun", "ScaleStack", "build_parser", "main", "reuseport_sockets"]

CHECK_TIMEOUT = 0.3  # HAProxy's default check timeout (meshkit.haproxy.config)


class ScaleRun:
    """The ramp, the measurements and the verdict against a started :class:`ScaleStack`."""

    def __init__(self, args: argparse.Namespace, stack: ScaleStack) -> None:
        self.args = args
        self.stack = stack
        assert stack.settings is not None
        self.env = settings_env(stack.settings) | stack.env
        self.samples: list[dict[str, Any]] = []
        self.phase = "ramp"

    async def sample(self, groups: Groups, done: asyncio.Event) -> None:
        """Every ``--sample`` s until ``done``: CPU per group, each gateway's ping time, and how
        long each gateway's registry record has left to live.

        ``groups`` may gain a group meanwhile (the clients, once spawned). A
        record is refreshed every ``heartbeat_interval`` (1 s) with a TTL of
        ``ttl`` (5 s): the least time left (``ttl_ms``) shows how late the
        gateway's heartbeat ran; at 0 the record expires and ``meshkit haproxy
        sync`` takes the gateway out of HAProxy.
        """
        settings = self.stack.settings
        assert settings is not None
        redis = pooled_redis(settings, max_connections=4)
        keys = Keys(settings.namespace)
        records = [keys.instance(g.record.key) for g in self.stack.gateways if g.record is not None]
        addrs = self.stack.gateway_addresses()
        last, last_t = cpu_of(groups), time.monotonic()
        try:
            while not done.is_set():
                pings = await asyncio.gather(*(ping_time(h, p) for h, p in addrs))
                ttls = [int(await redis.pttl(key)) for key in records]
                await asyncio.sleep(self.args.sample)
                now, now_t = cpu_of(groups), time.monotonic()
                span = now_t - last_t
                self.samples.append({
                    "t": round(now_t, 2), "phase": self.phase,
                    "ping_ms": [None if p is None else round(p * 1000, 1) for p in pings], "ttl_ms": ttls,
                    "cpu": {k: round((now[k] - last.get(k, now[k])) / span, 2) for k in now}})
                last, last_t = now, now_t
        finally:
            await redis.aclose()

    async def run(self) -> dict[str, Any]:
        a = self.args
        stack = self.stack
        groups = stack.groups()
        nprocs = a.client_procs
        shares = [a.clients // nprocs + (i < a.clients % nprocs) for i in range(nprocs)]
        req_shares = [a.requesters // nprocs + (i < a.requesters % nprocs) for i in range(nprocs)]
        rss_before, sock_before = rss_of(groups), sockstat_tcp()
        host, port = stack.address
        done = asyncio.Event()
        sampled = dict(groups)
        sampler = asyncio.create_task(self.sample(sampled, done))
        ramp_started = time.monotonic() + a.spawn_time  # every client process started by then
        procs = [await ClientProc.spawn(
            "hold", "--conns", str(n), "--topic", TOPIC, "--addr", f"{host}:{port}",
            "--connect-rate", str(a.ramp_rate / nprocs), "--requesters", str(r),
            "--request-rate", str(a.request_rate), "--start-at", str(ramp_started),
            env=self.env) for n, r in zip(shares, req_shares, strict=True)]
        sampled["clients"] = [p.pid for p in procs]
        try:
            for proc in procs:
                await proc.wait_ready(a.spawn_time + a.clients / a.ramp_rate + 120)
            ramp_s = time.monotonic() - ramp_started
            self.phase = "connected"
            await asyncio.sleep(1.0)  # let the last subscriptions settle before reading memory
            rss_after, sock_after = rss_of(groups), sockstat_tcp()
            fds = {k: fd_counts(v) for k, v in groups.items() if k in ("haproxy", "gateways")}
            self.phase = "push"
            pushes = await self.push_phase(procs, groups)
        finally:
            done.set()
            await sampler
        results = [await proc.result(120) for proc in procs]
        for proc in procs:
            await proc.close()
        return self.report(results, pushes, ramp_s, rss_before, rss_after, sock_before, sock_after, fds)

    async def push_phase(self, procs: list[ClientProc], groups: Groups) -> dict[str, Any]:
        """Requests from the requesters and ``--publishes`` timed pushes, at once."""
        a = self.args
        assert self.stack.settings is not None
        mesh = meshkit.AsyncClient(self.stack.settings)
        await mesh.start()
        loop = asyncio.get_running_loop()
        all_groups = {**groups, "publisher": [os.getpid()], "clients": [p.pid for p in procs]}
        before = cpu_of(all_groups)
        started = time.monotonic()
        for proc in procs:
            proc.send("go")
        times: list[float] = []
        reached: list[int] = []
        try:
            for seq in range(a.publishes):
                due = started + seq * a.push_every
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                t0 = time.monotonic()
                reached.append(int(await mesh.publish(TOPIC, {"seq": seq, "t": t0})))
                lasts = [await p.wait_seq(seq, loop.time() + a.push_timeout) for p in procs]
                if None not in lasts:
                    times.append(max(x for x in lasts if x is not None) - t0)
        finally:
            await mesh.close()
        took = time.monotonic() - started
        after = cpu_of(all_groups)
        for proc in procs:
            proc.send("done")
        return {"times": times, "gateways_reached": reached, "seconds": took,
                "cpu_s": {k: round(after[k] - before[k], 2) for k in after}}

    def report(self, results: list[dict[str, Any]], pushes: dict[str, Any], ramp_s: float,
               rss_before: dict[str, int], rss_after: dict[str, int], sock_before: dict[str, int],
               sock_after: dict[str, int], fds: dict[str, list[int]]) -> dict[str, Any]:
        a = self.args
        n = sum(r["conns"] for r in results)
        received = sum(r["received"] for r in results)
        latencies = [x for r in results for x in r["latency_ns"]]
        spread = percentiles([int(t * 1e9) for t in pushes["times"]])
        req = percentiles(latencies)
        phases = {phase: _phase_summary([s for s in self.samples if s["phase"] == phase])
                  for phase in ("ramp", "push")}
        downs = self.stack.check_downs()
        out: dict[str, Any] = {
            "clients": n, "wanted": a.clients, "ramp_rate": a.ramp_rate, "ramp_s": round(ramp_s, 1),
            "errors": sum(r["errors"] for r in results),
            "error_kinds": _merge(r["error_kinds"] for r in results),
            "disconnects": sum(r["disconnects"] for r in results),
            "publishes": a.publishes, "pushes_complete": len(pushes["times"]),
            "pushes_lost": n * a.publishes - received, "gateways_reached": pushes["gateways_reached"],
            "fanout_p50_ms": round(spread["p50_us"] / 1000, 1), "fanout_p99_ms": round(spread["p99_us"] / 1000, 1),
            "fanout_max_ms": round(max(pushes["times"], default=float("nan")) * 1000, 1),
            "requesters": a.requesters, "requests": sum(r["requests"] for r in results),
            "answered": sum(r["answered"] for r in results), "unanswered": sum(r["unanswered"] for r in results),
            "request_p50_ms": round(req["p50_us"] / 1000, 2), "request_p99_ms": round(req["p99_us"] / 1000, 2),
            "rss_per_conn_bytes": {k: round((rss_after[k] - rss_before[k]) / max(n, 1)) for k in rss_after},
            "kernel_tcp_mem_per_conn_bytes": round(
                (sock_after.get("mem", 0) - sock_before.get("mem", 0)) * os.sysconf("SC_PAGE_SIZE") / max(n, 1)),
            "tcp_sockets": {"before": sock_before.get("inuse"), "after": sock_after.get("inuse")},
            "fds_at_peak": fds,
            "push_phase_cpu_s": pushes["cpu_s"], "push_phase_s": round(pushes["seconds"], 1),
            "ramp": phases["ramp"], "push": phases["push"],
            "check_downs": downs,
        }
        out["series"] = self.samples
        out["passed"] = (n == a.clients and not out["errors"] and not out["disconnects"]
                         and not out["pushes_lost"] and not out["unanswered"]
                         and out["answered"] == out["requests"] and not downs)
        return out


def _phase_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Pings, record TTLs and CPU over the samples of one phase."""
    pings = [p for s in samples for p in s["ping_ms"]]
    ttls = [t for s in samples for t in s["ttl_ms"]]
    peak: dict[str, float] = {}
    for s in samples:
        for k, v in s["cpu"].items():
            peak[k] = max(peak.get(k, 0.0), v)
    mean = {k: round(sum(s["cpu"].get(k, 0.0) for s in samples) / max(1, len(samples)), 2) for k in peak}
    return {"samples": len(samples), "ping_failed": sum(1 for p in pings if p is None),
            "ping_over_300ms": sum(1 for p in pings if p is not None and p > CHECK_TIMEOUT * 1000),
            "ping_max_ms": max((p for p in pings if p is not None), default=None),
            "record_ttl_min_ms": min(ttls, default=None), "cpu_cores_mean": mean, "cpu_cores_peak": peak}


def _merge(docs: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for doc in docs:
        for k, v in doc.items():
            total[k] = total.get(k, 0) + v
    return total


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['clients']:,} of {r['wanted']:,} clients connected through {r['machine']['proxies']} HAProxy "
             f"processes to 2 gateways in {r['ramp_s']} s (paced at {r['ramp_rate']:g}/s)",
             f"errors {r['errors']} {r['error_kinds']}, disconnects {r['disconnects']}, pushes lost "
             f"{r['pushes_lost']}, unanswered {r['unanswered']}, HAProxy DOWN verdicts {len(r['check_downs'])}",
             f"push fan-out to all: p50 {r['fanout_p50_ms']} ms, p99 {r['fanout_p99_ms']} ms, max "
             f"{r['fanout_max_ms']} ms over {r['pushes_complete']}/{r['publishes']} pushes",
             f"requests from {r['requesters']:,} connections: {r['answered']:,}/{r['requests']:,} answered, "
             f"p50 {r['request_p50_ms']} ms, p99 {r['request_p99_ms']} ms",
             f"RSS per connection (bytes): {r['rss_per_conn_bytes']}; kernel TCP memory per connection "
             f"{r['kernel_tcp_mem_per_conn_bytes']} bytes",
             f"descriptors at peak: {r['fds_at_peak']}",
             f"ramp: gateway ping max {r['ramp']['ping_max_ms']} ms, {r['ramp']['ping_over_300ms']} over 300 ms, "
             f"{r['ramp']['ping_failed']} failed; record TTL min {r['ramp']['record_ttl_min_ms']} ms; "
             f"CPU cores mean {r['ramp']['cpu_cores_mean']} peak {r['ramp']['cpu_cores_peak']}",
             f"push: gateway ping max {r['push']['ping_max_ms']} ms, {r['push']['ping_over_300ms']} over 300 ms, "
             f"{r['push']['ping_failed']} failed; record TTL min {r['push']['record_ttl_min_ms']} ms; "
             f"CPU cores mean {r['push']['cpu_cores_mean']} peak {r['push']['cpu_cores_peak']}",
             f"push phase CPU seconds ({r['push_phase_s']} s): {r['push_phase_cpu_s']}",
             f"machine: {r['machine']}",
             "PASSED" if r["passed"] else "FAILED"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="N connections through HAProxy to two gateways (see the doc).")
    add = p.add_argument
    add("--json", action="store_true", help="print one JSON object")
    add("--clients", type=int, default=10000, help="connections (10000)")
    add("--client-procs", type=int, default=10, help="client processes (10)")
    add("--proxies", type=int, default=2, help="HAProxy processes sharing the public port (2)")
    add("--ramp-rate", type=float, default=400.0, help="new connections a second, all processes (400)")
    add("--requesters", type=int, default=1000, help="connections that send requests (1000)")
    add("--request-rate", type=float, default=1.0, help="requests a second per requester (1)")
    add("--publishes", type=int, default=20, help="timed pushes (20)")
    add("--push-every", type=float, default=1.0, help="seconds between pushes (1)")
    add("--push-timeout", type=float, default=30.0, help="seconds a push may take to reach all (30)")
    add("--sample", type=float, default=0.25, help="seconds between samples (0.25)")
    add("--spawn-time", type=float, default=5.0, help="seconds the client processes get to start (5)")
    add("--series", action="store_true", help="with --json: every sample too")
    add("--check-timeout", default="", help='HAProxy check timeout, e.g. "1s" (default: shipped, 300ms)')
    add("--check-fall", type=int, default=0, help="failed checks before DOWN (default: shipped, 2)")
    add("--workdir", help="keep the logs here (default: a temporary directory, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    old, new = raise_open_files()
    print(f"open-file limit raised from {old} to {new} (the hard limit)", file=sys.stderr)
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="meshkit-scale-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        stack = ScaleStack(default_config(), workdir)
        stack.proxies = args.proxies
        stack.check_timeout, stack.check_fall = args.check_timeout, args.check_fall
        try:
            stack.start()
            report = asyncio.run(ScaleRun(args, stack).run())
        finally:
            stack.stop()
    report["machine"] = {"nproc": os.cpu_count(), "open_files": [old, new], "proxies": args.proxies,
                         "check_timeout": args.check_timeout or "300ms", "check_fall": args.check_fall or 2,
                         "loadavg_at_start": load_start, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    if not args.series:
        report.pop("series", None)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
