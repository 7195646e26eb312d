"""RPC benchmark: meshkit against raw pyzmq and its other peers, in the same run, on the same machine.

Usage (from the project root)::

    .venv/bin/python bench/rpc.py              # a table (about a minute)
    .venv/bin/python bench/rpc.py --quick      # a smoke run (seconds)
    .venv/bin/python bench/rpc.py --json       # one JSON object on stdout
    .venv/bin/python bench/rpc.py --profile /tmp/prof --repeats 1   # cProfile both sides

These systems answer the same ``echo(value)`` call (``--systems`` picks a
subset; the peers beside ``raw`` are described in :mod:`rpc_peers`):

``raw``
    The practical Python limit: a ``zmq.asyncio`` DEALER client and ROUTER
    server, one msgpack frame ``[id, method, args]`` per request and
    ``[id, result]`` per reply, one ``await`` per message, the server handling
    each message inline (no task per message).
``meshkit``
    A real meshkit service (:class:`BenchService`) run by
    :func:`meshkit.runner.run`, registered in a private ``redis-server`` on a
    unix socket, bound on a kernel-chosen port, called through
    :class:`meshkit.AsyncClient` found through the registry. Server and
    client run on meshkit's event loop (uvloop, :mod:`meshkit.loops`); every
    other asyncio client here runs on asyncio's own loop, each system on a
    loop of its own.
``meshkit_asyncio``
    The same on asyncio's own loop, server and client: what uvloop buys.
``meshkit_statsd``
    The same, with statsd metrics on in server and client, sent to a local
    UDP socket nobody reads (a namespace and server of its own).
``raw_blocking``, ``raw_batched``, ``nats``, ``meshkit_sync``
    Plain blocking pyzmq; zmq.asyncio draining every queued message per
    wake-up; NATS request/reply through a private ``nats-server``; and the
    blocking :class:`meshkit.Client` (sequential, and ``--inflight`` threads
    sharing one client) against the ``meshkit`` server.

Each server runs in its own process, so client and server get a core each
(the client is this process). Three measurements per system:

``seq_p50_us`` / ``seq_p99_us``
    One call at a time (``--calls`` calls after ``--warmup``), 16-byte
    ``bytes`` payload; percentiles of the per-call round trip, microseconds.
``pipelined_calls_s``
    ``--pipelined-calls`` calls of the same payload with ``--inflight`` (64)
    in flight from this one process; completed calls per second. ``raw``
    keeps a 64-message window on its DEALER; meshkit runs 64 tasks each
    awaiting ``client.call`` in a loop (how an application would do it).
``big_MBps``
    ``--big-calls`` echoes of a 64 KiB ``bytes`` payload, ``--inflight`` in
    flight. Payload megabytes (10**6 bytes) per second counted **one way**:
    ``calls * 65536 / seconds / 1e6``. The bytes on the wire are twice that
    (request and reply), plus framing.

``cpu_us_per_call``
    For each workload, CPU microseconds per call used by the client process
    and by the server process (all threads: libzmq's I/O thread, pyzmq's
    garbage-collector thread). Far steadier than wall-clock figures on a busy
    machine; the side that needs more CPU per call bounds the throughput.

Every measurement is repeated ``--repeats`` times, the order of the systems
reversed every other repeat, and the median of the repeats is reported (the
machine is shared and noisy). ``ratios`` are meshkit / raw of those medians; ``paired_ratios``
are the medians of the per-repeat ratios (the two systems ran back to back,
so a drift in the machine's load cancels out). The targets: seq p50 <= 1.3x,
pipelined >= 0.8x, 64 KiB >= 0.8x. ``vs_raw`` gives every system's medians
over raw's.

This is a benchmark, not a test: it asserts nothing and pytest does not
collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import rpc_peers
from rpc_clients import (
    SERVICE,
    SMALL,
    BatchedClient,
    BlockingRawClient,
    Client,
    CpuMeter,
    MeshkitClient,
    NatsClient,
    RawClient,
    SyncMeshkitClient,
    call_once,
    measure_seq,
    measure_throughput,
    run_pipelined,
)
from rpc_report import Runs, format_table, machine_info, print_profile, summarize

import meshkit
import meshkit.loops
from meshkit.config import Settings
from meshkit.registry import read_records
from meshkit.testing import RedisServer, settings_env, test_settings

BIG_SIZE = 64 * 1024
SYSTEMS = ("raw", "raw_blocking", "raw_batched", "nats", "meshkit", "meshkit_asyncio", "meshkit_statsd",
           "meshkit_sync")
# The client of each of these runs on meshkit's own loop (uvloop, meshkit/loops.py), as its
# server does; every other client, meshkit_asyncio's included, runs on asyncio's own loop.
ON_MESHKIT_LOOP = ("meshkit", "meshkit_statsd", "meshkit_sync")
ENDPOINT_SERVERS = ("raw", "raw_blocking", "raw_batched")  # print a tcp:// endpoint
SERVER_OF = {"meshkit_sync": "meshkit"}  # the blocking client calls the meshkit server
WORKLOADS = ("seq", "pipelined", "big")


class BenchService(meshkit.Service):
    """The meshkit side: ``echo(value)`` returns ``value``."""

    name = SERVICE

    @meshkit.rpc(idempotent=True)
    async def echo(self, value: Any) -> Any:
        return value


# -- servers (child processes) ------------------------------------------------


def _serve_meshkit() -> int:
    """Run :class:`BenchService` the way ``meshkit run`` does (settings from MESHKIT_*)."""
    from meshkit.runner import run

    return run(BenchService, Settings.load())


def _serve_meshkit_asyncio() -> int:
    """The same on asyncio's own event loop instead of uvloop: what uvloop buys."""
    from meshkit.runner import run

    return run(BenchService, Settings.load(), loop_factory=asyncio.new_event_loop)


def _child_main(system: str, profile_out: str | None, cpu: int | None, nats_url: str) -> int:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    serves: dict[str, Callable[[], int]] = {
        "raw": rpc_peers.serve_raw, "raw_blocking": rpc_peers.serve_blocking,
        "raw_batched": rpc_peers.serve_batched, "nats": lambda: rpc_peers.serve_nats(nats_url),
        "meshkit": _serve_meshkit, "meshkit_statsd": _serve_meshkit,
        "meshkit_asyncio": _serve_meshkit_asyncio}
    serve = serves[system]
    if not profile_out:
        return serve()
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(serve)
    finally:
        profiler.dump_stats(profile_out)


@dataclass
class ServerProcess:
    system: str
    process: subprocess.Popen[bytes]
    endpoint: str = ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_server(system: str, settings: Settings, profile_out: str | None,
                 cpu: int | None, nats_url: str = "") -> ServerProcess:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", system, "--nats-url", nats_url]
    if profile_out:
        cmd += ["--profile-out", profile_out]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if system in (*ENDPOINT_SERVERS, "nats"):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        said = proc.stdout.readline().decode().strip()
        if not (said.startswith("tcp://") or said == "ready"):
            proc.kill()
            raise RuntimeError(f"{system} server did not start (got {said[:80]!r})")
        return ServerProcess(system, proc, said)
    env.update(settings_env(settings))
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 20.0
    try:
        while not any(r.pid == proc.pid and r.is_up for r in read_records(settings, SERVICE)):
            if proc.poll() is not None:
                raise RuntimeError(f"meshkit bench service exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("meshkit bench service did not register within 20 s")
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    return ServerProcess(system, proc)


# -- clients -------------------------------------------------------------------


async def make_client(system: str, server: ServerProcess, settings: dict[str, Settings],
                      nats_url: str) -> Client:
    """The client of ``system``, connected and ready for its first measured call."""
    if system == "raw":
        return RawClient(server.endpoint)
    if system == "raw_batched":
        return BatchedClient(server.endpoint)
    if system == "raw_blocking":
        return BlockingRawClient(server.endpoint)
    if system == "nats":
        nc = NatsClient(nats_url)
        await nc.start()
        return nc
    if system == "meshkit_sync":
        return await asyncio.to_thread(SyncMeshkitClient, settings[system], SERVICE)
    mk = MeshkitClient(settings[system])
    await mk.start()
    return mk


@contextmanager
def _profiling(profiler: cProfile.Profile | None) -> Iterator[None]:
    if profiler is not None:
        profiler.enable()
    try:
        yield
    finally:
        if profiler is not None:
            profiler.disable()


def run_benchmark(args: argparse.Namespace, settings: dict[str, Settings],
                  servers: dict[str, ServerProcess], nats_url: str) -> tuple[Runs, Runs]:
    """Every measurement ``args.repeats`` times; returns (figures, CPU us per call).

    ``servers`` has one entry per system in ``args.systems`` (``meshkit_sync``
    shares ``meshkit``'s), ``settings`` one per meshkit system. Each system's
    client lives on an event loop of its own (see :data:`ON_MESHKIT_LOOP`),
    and each measurement runs that loop until it is done, so systems never
    share a loop and never run at the same time.
    """
    loops_of = {s: (meshkit.loops.new_event_loop() if s in ON_MESHKIT_LOOP else asyncio.new_event_loop())
                for s in args.systems}
    try:
        return _measure_all(args, settings, servers, nats_url, loops_of)
    finally:
        for loop in loops_of.values():
            loop.close()


def _measure_all(args: argparse.Namespace, settings: dict[str, Settings], servers: dict[str, ServerProcess],
                 nats_url: str, loops_of: dict[str, asyncio.AbstractEventLoop]) -> tuple[Runs, Runs]:
    clients: dict[str, Client] = {}
    profilers: dict[str, cProfile.Profile | None] = {}
    meters: dict[str, CpuMeter] = {}
    for system in args.systems:
        server = servers[SERVER_OF.get(system, system)]
        clients[system] = loops_of[system].run_until_complete(make_client(system, server, settings, nats_url))
        profilers[system] = cProfile.Profile() if args.profile else None
        meters[system] = CpuMeter(server.process.pid)
    big = os.urandom(args.big_size)
    # Connection set-up and first-call costs stay out of every figure.
    for system, client in clients.items():
        loops_of[system].run_until_complete(_warm_up(system, client, big, args.inflight))

    runs: Runs = {s: {"seq_p50_us": [], "seq_p99_us": [], "pipelined_calls_s": [], "big_MBps": []}
                  for s in clients}
    cpu: Runs = {s: {f"{w}_{side}": [] for w in args.workloads for side in ("client", "server")}
                 for s in clients}
    for r in range(args.repeats):
        order = list(clients) if r % 2 == 0 else list(reversed(clients))
        for kind in args.workloads:
            for system in order:
                client, meter = clients[system], meters[system]
                gc.collect()
                with _profiling(profilers[system]):
                    shown = loops_of[system].run_until_complete(
                        _measure(kind, client, meter, big, args, runs[system]))
                cpu[system][f"{kind}_client"].append(meter.client_us)
                cpu[system][f"{kind}_server"].append(meter.server_us)
                _progress(f"repeat {r + 1}/{args.repeats}  {kind:<9}  {system:<7}  {shown:<26}"
                          f"cpu/call client {meter.client_us:5.1f} us  server {meter.server_us:5.1f} us")
    for system, client in clients.items():
        loops_of[system].run_until_complete(client.close())
        profiler = profilers[system]
        if profiler is not None:
            profiler.dump_stats(os.path.join(args.profile, f"{system}-client.prof"))
    return runs, cpu


async def _warm_up(system: str, client: Client, big: bytes, inflight: int) -> None:
    if await call_once(client, SMALL) != SMALL or await call_once(client, big) != big:
        raise RuntimeError(f"{system} did not echo its payload")
    await run_pipelined(client, SMALL, 500, inflight)


async def _measure(kind: str, client: Client, meter: CpuMeter, big: bytes, args: argparse.Namespace,
                   runs: dict[str, list[float]]) -> str:
    """One measurement of ``kind``, appended to ``runs``; returns it as text."""
    if kind == "seq":
        p50, p99 = await measure_seq(client, args.calls, args.warmup, meter)
        runs["seq_p50_us"].append(p50)
        runs["seq_p99_us"].append(p99)
        return f"p50 {p50:.0f} us  p99 {p99:.0f} us"
    if kind == "pipelined":
        rate = await measure_throughput(client, SMALL, args.pipelined_calls, args.inflight, meter)
        runs["pipelined_calls_s"].append(rate)
        return f"{rate:,.0f} calls/s"
    rate = await measure_throughput(client, big, args.big_calls, args.inflight, meter)
    mbps = rate * args.big_size / 1e6
    runs["big_MBps"].append(mbps)
    return f"{mbps:,.1f} MB/s"


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- main ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="RPC benchmark: meshkit against raw pyzmq.")
    add = p.add_argument
    add("--json", action="store_true", help="print one JSON object instead of a table")
    add("--calls", type=int, default=1500, help="sequential calls per repeat (1500)")
    add("--warmup", type=int, default=200, help="unmeasured calls before each sequential run")
    add("--pipelined-calls", type=int, default=15000, help="small calls per repeat (15000)")
    add("--big-calls", type=int, default=2000, help="64 KiB calls per repeat (2000)")
    add("--big-size", type=int, default=BIG_SIZE, help="big payload in bytes (65536)")
    add("--inflight", type=int, default=64, help="calls in flight when pipelined (64)")
    add("--repeats", "--repeat", type=int, default=7, help="runs of each measurement, medians reported (7)")
    add("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    add("--workloads", default="seq,pipelined,big",
        help="comma-separated subset of seq,pipelined,big (e.g. to profile one)")
    add("--pin", action="store_true",
        help="pin the client to one CPU and the servers to another (needs 2 CPUs)")
    add("--profile", metavar="DIR",
        help="cProfile clients and servers; write DIR/<system>-{client,server}.prof")
    add("--profile-top", type=int, default=25, help="rows of each profile to print (25)")
    add("--quick", action="store_true", help="a smoke run: few calls, one repeat (seconds)")
    add("--serve", choices=SYSTEMS, help=argparse.SUPPRESS)
    add("--profile-out", help=argparse.SUPPRESS)
    add("--cpu", type=int, help=argparse.SUPPRESS)
    add("--nats-url", default="", help=argparse.SUPPRESS)
    return p


def _start_all(args: argparse.Namespace, redis_url: str, server_cpu: int | None,
               started: list[Any]) -> tuple[dict[str, Settings], dict[str, ServerProcess], str]:
    """Every server ``args.systems`` needs (appended to ``started`` as they start, for the
    caller to stop); returns the meshkit settings per system, the servers and the NATS URL."""
    common: dict[str, Any] = {"heartbeat_interval": 1.0, "ttl": 5.0, "resync_interval": 3.0,
                              "log_level": "WARNING", "drain_grace": 2.0}
    settings = {"meshkit": test_settings(redis_url, **common)}
    settings["meshkit_sync"] = settings["meshkit"]
    if "meshkit_asyncio" in args.systems:
        settings["meshkit_asyncio"] = test_settings(redis_url, **common)  # a namespace of its own
    if "meshkit_statsd" in args.systems:
        # A UDP socket nobody reads: the datagrams are sent (the cost we want
        # to see) and then dropped by the kernel once its buffer is full.
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        started.append(sink)
        settings["meshkit_statsd"] = test_settings(
            redis_url, statsd_address=f"127.0.0.1:{sink.getsockname()[1]}", **common)
    nats_url = ""
    if "nats" in args.systems:
        nats_server = rpc_peers.NatsServer()
        started.append(nats_server)
        nats_url = nats_server.start().url
    servers: dict[str, ServerProcess] = {}
    for system in dict.fromkeys(SERVER_OF.get(s, s) for s in args.systems):
        prof = os.path.join(args.profile, f"{system}-server.prof") if args.profile else None
        servers[system] = start_server(system, settings.get(system, settings["meshkit"]), prof,
                                       server_cpu, nats_url)
        started.append(servers[system])
    return settings, servers, nats_url


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        return _child_main(args.serve, args.profile_out, args.cpu, args.nats_url)
    if args.quick:
        args.calls, args.warmup, args.pipelined_calls, args.big_calls, args.repeats = 300, 50, 3000, 300, 1
    args.systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    args.workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
    if not args.systems or not args.workloads:
        raise SystemExit(f"--systems takes some of {','.join(SYSTEMS)}; --workloads seq, pipelined, big")
    client_cpu = server_cpu = None
    if args.pin and len(os.sched_getaffinity(0)) >= 2:
        client_cpu, server_cpu = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, {client_cpu})
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    # meshkit's own account of peers lost or records dropped, should a run fail.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("meshkit").addHandler(handler)
    logging.getLogger("meshkit").setLevel(logging.INFO)
    machine = machine_info()
    started = time.monotonic()
    redis_server = RedisServer().start()
    running: list[Any] = []
    try:
        settings, servers, nats_url = _start_all(args, redis_server.url, server_cpu, running)
        runs, cpu = run_benchmark(args, settings, servers, nats_url)
    finally:
        for thing in reversed(running):
            if isinstance(thing, socket.socket):
                thing.close()
            else:
                thing.stop()
        redis_server.stop()
    summary = summarize(runs, cpu)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    seconds = round(time.monotonic() - started, 1)
    if args.json:
        config = {k: getattr(args, k) for k in ("calls", "warmup", "pipelined_calls", "big_calls",
                                                 "big_size", "inflight", "repeats", "pin", "systems")}
        out = {**summary, "machine": machine, "config": config, "seconds": seconds,
               "runs": runs, "cpu_runs": cpu}
        print(json.dumps(out, indent=2))
    else:
        print(f"{machine['cpu_model']}, {machine['nproc']} CPUs, Python {machine['python']}, "
              f"pyzmq {machine['pyzmq']} / libzmq {machine['libzmq']}; load "
              f"{machine['loadavg_at_start'][0]} -> {machine['loadavg_at_end'][0]}; "
              f"medians of {args.repeats} repeats; {seconds:.0f} s")
        print(format_table(summary, args.systems, args.workloads))
    if args.profile:
        for name in sorted(os.listdir(args.profile)):
            if name.endswith(".prof"):
                print_profile(os.path.join(args.profile, name), name[:-5], args.profile_top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
