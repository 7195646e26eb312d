"""The edge benchmark: the whole client-facing path against the one-process server it replaces.

Usage (from the project root)::

    .venv/bin/python bench/edge.py              # a table (about a minute)
    .venv/bin/python bench/edge.py --quick      # a smoke run: small N, well under a minute
    .venv/bin/python bench/edge.py --json       # one JSON object on stdout
    .venv/bin/python bench/edge.py --scale 10000  # N held clients, two HAProxy (edge_scale.py)
    .venv/bin/python bench/edge.py --profile /tmp/prof  # py-spy on each gateway, per measured part

The server processes run from a temporary directory, so ``PYTHONPATH``
alone chooses the code they run (``"meshkit"`` in the JSON's ``machine``
says which): ``PYTHONPATH=/path/to/other/tree`` compares two trees; without
it they run the tree this file is in.

It starts, in one run and on one machine, the meshkit stack (a private
``redis-server`` on a unix socket, 2 ``echo`` backends, 2 gateways and
``meshkit haproxy sync`` running HAProxy on a socket bound here on
``127.0.0.1:0``; :mod:`edge_stack`, built on the restart proof's
:mod:`proofstack`) and the **baseline**, :mod:`edge_baseline`: one asyncio
process that holds the connections and answers JSON lines itself, which is
what users run today. Every client runs in a process of its own
(:mod:`edge_clients`); every request is ``echo.echo`` of a 16-byte string.

What is measured (``--repeat`` runs of each path, medians reported, the
order of the paths alternating between runs):

``seq``        one request at a time, p50/p99 of the round trip, over four paths:
               ``mesh`` (an :class:`meshkit.AsyncClient` calling a backend directly),
               ``gateway`` (JSON lines straight to a gateway's port, no HAProxy),
               ``haproxy`` (JSON lines through HAProxy and a gateway) and ``baseline``
``pipelined``  ``--conns`` (64) connections each keeping ``--inflight`` (8) requests in
               flight, over ``gateway`` (connections spread over both), ``haproxy`` and
               ``baseline``: requests per second and p50/p99
``fanout``     N clients connected through HAProxy (or to the baseline), subscribed to
               ``bench.tick``; ``--publishes`` (>= 20) pushes, one after the other, each
               timed from just before the publish call until the last client has it
               (clients share the machine's monotonic clock); p50/p99, pushes lost,
               CPU per delivered push, and resident memory per connected client (the
               servers' RSS with N clients connected minus before they connected)

CPU is user + system time from ``/proc/PID/stat`` of every process of a group
(``haproxy`` is the sync process and HAProxy; ``gateways``; ``backends``;
``server`` for the baseline; ``clients``; ``publisher`` is this process),
read right before and after the measured part, in microseconds per request
(or per delivered push). The clock tick is 10 ms, so figures rest on runs of
thousands of requests. Ratios are meshkit's path over the baseline, from the
same run. The open-file limit is raised to the hard limit first (5,000
clients need it); the output says to what. Load averages at start and end
are printed: a figure from a busy machine is only good for a ratio.
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge_clients import PAYLOAD, Lines, percentiles
from edge_stack import (
    TOPIC,
    Baseline,
    ClientProc,
    EdgeStack,
    Groups,
    cpu_of,
    default_config,
    per_item_us,
    raise_open_files,
    rss_of,
    start_spies,
    stop_spies,
)

import meshkit
from meshkit.testing import settings_env

SEQ_PATHS = ("mesh", "gateway", "haproxy", "baseline")
PIPE_PATHS = ("gateway", "haproxy", "baseline")
SYSTEMS = ("meshkit", "baseline")
CONNS_PER_CLIENT_PROCESS = 1000


class EdgeBench:
    """Runs every measurement against a started :class:`EdgeStack` and :class:`Baseline`."""

    def __init__(self, args: argparse.Namespace, stack: EdgeStack, baseline: Baseline) -> None:
        self.args = args
        self.stack = stack
        self.baseline = baseline
        assert stack.settings is not None
        self.env = settings_env(stack.settings) | stack.env
        self._spied = 0

    def groups(self, system: str) -> Groups:
        """The server-side process groups of ``system`` (``meshkit`` or ``baseline``)."""
        return self.stack.groups() if system == "meshkit" else self.baseline.groups()

    def spy(self, system: str, what: str) -> list[subprocess.Popen[bytes]]:
        """With ``--profile DIR``: py-spy on each gateway until :func:`stop_spies` (files in DIR)."""
        if not self.args.profile or system != "meshkit":
            return []
        self._spied += 1
        return start_spies(self.args.py_spy, self.stack.groups()["gateways"], Path(self.args.profile),
                           f"{self._spied:02d}-{what}")

    def addrs(self, path: str) -> list[str]:
        if path == "gateway":
            pairs = self.stack.gateway_addresses()
        elif path == "haproxy":
            pairs = [self.stack.address]
        elif path == "baseline":
            pairs = [self.baseline.address]
        else:
            return []
        return [arg for host, port in pairs for arg in ("--addr", f"{host}:{port}")]

    async def run_clients(self, system: str, specs: list[list[str]],
                          timeout: float) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, float]]:
        """Start one client process per spec, wait until all are ready, say go; results and CPU."""
        procs = [await ClientProc.spawn(*spec, env=self.env) for spec in specs]
        for proc in procs:
            await proc.wait_ready(timeout)
        groups = {**self.groups(system), "clients": [p.pid for p in procs]}
        before = cpu_of(groups)
        spies = self.spy(system, specs[0][0])
        for proc in procs:
            proc.send("go")
        results = [await proc.result(timeout) for proc in procs]
        after = cpu_of(groups)
        await stop_spies(spies)
        for proc in procs:
            await proc.close()
        return results, before, after

    async def seq(self, path: str) -> dict[str, Any]:
        a = self.args
        spec = ["seq", "--target", "mesh" if path == "mesh" else "lines", "--calls", str(a.calls),
                "--warmup", str(a.warmup), *self.addrs(path)]
        system = "baseline" if path == "baseline" else "meshkit"
        [result], before, after = await self.run_clients(system, [spec], 120)
        return {"p50_us": result["p50_us"], "p99_us": result["p99_us"], "errors": result["errors"],
                "cpu_us": per_item_us(before, after, result["calls"])}

    async def pipelined(self, path: str) -> dict[str, Any]:
        a = self.args
        spec = ["pipelined", "--conns", str(a.conns), "--inflight", str(a.inflight),
                "--calls", str(a.pipelined_calls), *self.addrs(path)]
        system = "baseline" if path == "baseline" else "meshkit"
        [result], before, after = await self.run_clients(system, [spec], 300)
        return {"calls_s": round(result["calls_s"]), "p50_us": result["p50_us"],
                "p99_us": result["p99_us"], "errors": result["errors"],
                "cpu_us": per_item_us(before, after, result["calls"])}

    async def fanout(self, system: str, clients: int,
                     publisher: Callable[[int, float], Awaitable[int]]) -> dict[str, Any]:
        """N clients subscribed; ``publisher(seq, started)`` pushes one and says how many it reached."""
        a = self.args
        path = "haproxy" if system == "meshkit" else "baseline"
        nprocs = -(-clients // CONNS_PER_CLIENT_PROCESS)
        shares = [clients // nprocs + (i < clients % nprocs) for i in range(nprocs)]
        server = self.groups(system)
        rss_before = rss_of(server)
        procs = [await ClientProc.spawn("fanout", "--conns", str(n), "--topic", TOPIC,
                                        *self.addrs(path), env=self.env) for n in shares]
        for proc in procs:
            await proc.wait_ready(300)
        rss_after = rss_of(server)
        groups = {**server, "publisher": [os.getpid()], "clients": [p.pid for p in procs]}
        spies = self.spy(system, f"fanout{clients}")
        for proc in procs:
            proc.send("go")
        loop = asyncio.get_running_loop()
        times: list[float] = []
        before = cpu_of(groups)
        for seq in range(a.publishes):
            started = time.monotonic()
            if not await publisher(seq, started):
                raise RuntimeError(f"{system}: push {seq} reached no subscriber (gateway or baseline)")
            lasts = [await p.wait_seq(seq, loop.time() + a.push_timeout) for p in procs]
            if None not in lasts:
                times.append(max(x for x in lasts if x is not None) - started)
        after = cpu_of(groups)
        await stop_spies(spies)
        for proc in procs:
            proc.send("done")
        results = [await proc.result(60) for proc in procs]
        for proc in procs:
            await proc.close()
        received = sum(r["received"] for r in results)
        spread = percentiles([int(t * 1e9) for t in times])
        return {"clients": clients, "publishes": a.publishes, "complete": len(times),
                "p50_ms": round(spread["p50_us"] / 1000, 2), "p99_ms": round(spread["p99_us"] / 1000, 2),
                "lost": clients * a.publishes - received, "errors": sum(r["errors"] for r in results),
                "cpu_us_per_push": per_item_us(before, after, received),
                "rss_per_client_bytes": {k: round((rss_after[k] - rss_before[k]) / clients)
                                         for k in rss_after}}

    async def run(self) -> dict[str, list[dict[str, Any]]]:
        """Every measurement; raw runs keyed ``seq:PATH``, ``pipelined:PATH``, ``fanout:SYSTEM:N``."""
        a = self.args
        runs: dict[str, list[dict[str, Any]]] = {}

        def note(key: str, figures: dict[str, Any]) -> None:
            runs.setdefault(key, []).append(figures)
            shown = {k: v for k, v in figures.items() if not isinstance(v, dict)}
            print(f"  {key:<22} {shown}", file=sys.stderr, flush=True)

        for r in range(a.repeat):
            print(f"repeat {r + 1}/{a.repeat}", file=sys.stderr, flush=True)
            for path in _alternate(SEQ_PATHS, r):
                note(f"seq:{path}", await self.seq(path))
            for path in _alternate(PIPE_PATHS, r):
                note(f"pipelined:{path}", await self.pipelined(path))
        assert self.stack.settings is not None
        mesh = meshkit.AsyncClient(self.stack.settings)
        await mesh.start()
        base = await Lines.open(*self.baseline.address)

        async def publish_mesh(seq: int, started: float) -> int:
            return int(await mesh.publish(TOPIC, {"seq": seq, "t": started}))

        async def publish_base(seq: int, started: float) -> int:
            return int(await base.call("bench.publish", [TOPIC, {"seq": seq, "t": started}]))

        try:
            for r in range(a.fanout_repeat):
                for n in a.fanout:
                    for system in _alternate(SYSTEMS, r):
                        pub = publish_mesh if system == "meshkit" else publish_base
                        note(f"fanout:{system}:{n}", await self.fanout(system, n, pub))
        finally:
            await mesh.close()
            base.writer.close()
        return runs


def _alternate(items: tuple[str, ...], run: int) -> tuple[str, ...]:
    """``items`` in order on even runs, reversed on odd ones (so no path always goes first)."""
    return items if run % 2 == 0 else tuple(reversed(items))


def _median_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-key median of a list of like-shaped result dicts (nested dicts too)."""
    out: dict[str, Any] = {}
    for key, value in docs[0].items():
        if isinstance(value, dict):
            out[key] = _median_of([d[key] for d in docs])
        elif isinstance(value, (int, float)):
            out[key] = round(statistics.median(d[key] for d in docs), 1)
    return out


def server_cpu(cpu: dict[str, float]) -> float:
    """CPU of everything but the load generators (clients and publisher)."""
    return round(sum(v for k, v in cpu.items() if k not in ("clients", "publisher")), 1)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {key: _median_of(docs) for key, docs in runs.items()}
    out: dict[str, Any] = {"seq": {}, "pipelined": {}, "fanout": {}, "ratios": {}}
    for key, figures in med.items():
        kind, _, rest = key.partition(":")
        figures["server_cpu_us"] = server_cpu(figures.get("cpu_us", figures.get("cpu_us_per_push", {})))
        if kind == "fanout":
            system, n = rest.split(":")
            out["fanout"].setdefault(system, {})[n] = figures
        else:
            out[kind][rest] = figures
    ratios = out["ratios"]
    for kind, metric in (("seq", "p50_us"), ("seq", "server_cpu_us"), ("pipelined", "calls_s"),
                         ("pipelined", "p50_us"), ("pipelined", "server_cpu_us")):
        base = out[kind].get("baseline", {}).get(metric)
        for path, figures in out[kind].items():
            if path != "baseline" and base:
                ratios[f"{kind}:{path}:{metric}"] = round(figures[metric] / base, 2)
    for n, figures in out["fanout"].get("meshkit", {}).items():
        base = out["fanout"].get("baseline", {}).get(n, {})
        for metric in ("p50_ms", "server_cpu_us"):
            if base.get(metric):
                ratios[f"fanout:{n}:{metric}"] = round(figures[metric] / base[metric], 2)
    return out


def _cpu_cell(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={v:g}" for k, v in cpu.items() if k != "publisher" or v)


def format_table(s: dict[str, Any]) -> str:
    r = s["ratios"]
    lines = ["sequential (one request at a time)",
             f"  {'path':<9} {'p50 us':>8} {'p99 us':>8} {'x base':>7} {'srv cpu/req':>11}  cpu us/req by group"]
    for path, f in s["seq"].items():
        ratio = r.get(f"seq:{path}:p50_us")
        lines.append(f"  {path:<9} {f['p50_us']:>8.0f} {f['p99_us']:>8.0f} "
                     f"{(f'{ratio:.2f}x' if ratio else ''):>7} {f['server_cpu_us']:>11.0f}  {_cpu_cell(f['cpu_us'])}")
    lines += ["pipelined (connections x in flight)",
              f"  {'path':<9} {'req/s':>8} {'p50 us':>8} {'p99 us':>8} {'x base':>7} {'srv cpu/req':>11}  "
              "cpu us/req by group"]
    for path, f in s["pipelined"].items():
        ratio = r.get(f"pipelined:{path}:calls_s")
        lines.append(f"  {path:<9} {f['calls_s']:>8,.0f} {f['p50_us']:>8.0f} {f['p99_us']:>8.0f} "
                     f"{(f'{ratio:.2f}x' if ratio else ''):>7} {f['server_cpu_us']:>11.0f}  {_cpu_cell(f['cpu_us'])}")
    lines += ["push fan-out (time until the last client has it)",
              f"  {'system':<9} {'N':>6} {'p50 ms':>8} {'p99 ms':>8} {'x base':>7} {'lost':>5} "
              f"{'srv cpu/push':>12} {'RSS/client':>10}  cpu us/push by group"]
    for system, by_n in s["fanout"].items():
        for n, f in by_n.items():
            ratio = r.get(f"fanout:{n}:p50_ms") if system == "meshkit" else None
            rss = sum(v for k, v in f["rss_per_client_bytes"].items())
            lines.append(f"  {system:<9} {n:>6} {f['p50_ms']:>8.1f} {f['p99_ms']:>8.1f} "
                         f"{(f'{ratio:.2f}x' if ratio else ''):>7} {f['lost']:>5.0f} "
                         f"{f['server_cpu_us']:>12.1f} {rss / 1024:>8.1f}KB  {_cpu_cell(f['cpu_us_per_push'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The edge path against the one-process baseline.")
    add = p.add_argument
    add("--json", action="store_true", help="print one JSON object instead of a table")
    add("--quick", action="store_true", help="a smoke run: few calls, N = 50 and 200, one repeat")
    add("--repeat", type=int, default=3, help="runs of each sequential and pipelined path (3)")
    add("--fanout-repeat", type=int, default=1, help="runs of each fan-out size (1)")
    add("--calls", type=int, default=2000, help="sequential requests per run (2000)")
    add("--warmup", type=int, default=200, help="unmeasured sequential requests first (200)")
    add("--pipelined-calls", type=int, default=20000, help="pipelined requests per run (20000)")
    add("--conns", type=int, default=64, help="pipelined connections (64)")
    add("--inflight", type=int, default=8, help="requests in flight per connection (8)")
    add("--fanout", default="100,1000,5000", help="fan-out sizes, comma-separated")
    add("--publishes", type=int, default=20, help="pushes per fan-out size (20)")
    add("--push-timeout", type=float, default=20.0, help="seconds a push may take to reach all")
    add("--profile", metavar="DIR", help="sample each gateway with py-spy during each measured part "
        "(collapsed stacks in DIR; CPU figures then include its cost)")
    add("--py-spy", default="py-spy", help="the py-spy executable (for --profile)")
    add("--scale", type=int, default=0, metavar="N",
        help="instead: N clients held through two HAProxy processes (edge_scale.py; its options follow)")
    add("--web", action="store_true", help="HTTP and WebSocket beside TCP per request instead (bench/edge_http.py)")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.scale:
        import edge_scale

        raw = list(sys.argv[1:] if argv is None else argv)
        at = next(i for i, a in enumerate(raw) if a == "--scale" or a.startswith("--scale="))
        del raw[at:at + (1 if "=" in raw[at] else 2)]  # every other option is edge_scale's
        return edge_scale.main(["--clients", str(args.scale), *raw])
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.web:  # the listeners' own cost: bench/edge_http.py, with the flags it shares
        import edge_http
        return edge_http.main([f for f in ("--quick", "--json") if getattr(args, f[2:])])
    if args.quick:
        args.repeat, args.calls, args.warmup, args.pipelined_calls = 1, 300, 50, 3000
        args.fanout, args.publishes = "50,200", 20
    args.fanout = [int(n) for n in args.fanout.split(",") if n]
    old, new = raise_open_files()
    print(f"open-file limit raised from {old} to {new} (the hard limit)", file=sys.stderr)
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="meshkit-edge-"))
    # Out of any source tree: `python -m meshkit` (every server process) puts its working
    # directory first on sys.path, so started from a tree it would run that tree's code
    # whatever PYTHONPATH says, and a before/after comparison would compare nothing.
    # Without PYTHONPATH the servers run this tree's code (meshkit and services/), as they would
    # have from here.
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    os.chdir(workdir)
    stack, baseline = EdgeStack(default_config(), workdir), Baseline()
    try:
        stack.start()
        baseline.start()
        runs = asyncio.run(EdgeBench(args, stack, baseline).run())
    finally:
        baseline.stop()
        stack.stop()
    summary = summarize(runs)
    machine: dict[str, Any] = {"nproc": os.cpu_count(), "open_files": [old, new], "loadavg_at_start": load_start,
               "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
               "seconds": round(time.monotonic() - started, 1), "payload": PAYLOAD,
               "meshkit": str(Path(meshkit.__file__).parent)}
    config = {k: getattr(args, k) for k in ("repeat", "fanout_repeat", "calls", "pipelined_calls",
                                             "conns", "inflight", "fanout", "publishes", "quick")}
    if args.json:
        print(json.dumps({**summary, "machine": machine, "config": config, "runs": runs}, indent=2))
    else:
        print(f"{machine['nproc']} CPUs; open files {old} -> {new}; load {load_start[0]} -> "
              f"{machine['loadavg_at_end'][0]}; medians of {args.repeat} runs; {machine['seconds']:.0f} s")
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
