"""The processes of ``bench/edge.py``, their CPU and memory counters, and its client processes.

:class:`EdgeStack` is :class:`proofstack.Stack` (the restart proof's
processes: private Redis on a unix socket, services and gateways on port 0,
HAProxy on a socket bound here on ``127.0.0.1:0``) with ``echo`` backends
instead of the Stratum ones. :class:`Baseline` is the one-process server of
:mod:`edge_baseline`. HAProxy's processes are found in ``/proc`` by their
run directory. CPU time comes from ``/proc/PID/stat`` (user + system, every
thread, in clock ticks), resident memory from ``/proc/PID/statm``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proofstack import GATEWAY, LISTENER, ProofConfig, Stack

from meshkit.testing import test_settings

ECHO = "services.echo:Echo"
TOPIC = "bench.tick"
HERE = Path(__file__).resolve().parent
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


#: The open-file limit asked for when the process may raise its hard limit (root): 10,000
#: clients through HAProxy need ~20,000 descriptors in HAProxy alone (two per connection).
WANTED_OPEN_FILES = 65536


def raise_open_files() -> tuple[int, int]:
    """Raise this process's open-file limit (children inherit it); (old, new).

    To :data:`WANTED_OPEN_FILES` where the hard limit may be raised (as root,
    up to ``/proc/sys/fs/nr_open``), else to the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard < WANTED_OPEN_FILES:
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_OPEN_FILES, WANTED_OPEN_FILES))
    except (ValueError, OSError):
        pass  # not allowed to raise the hard limit: the hard limit it is
    soft_now, hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_now < hard_now:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_now, hard_now))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (all threads), from ``/proc/PID/stat``; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


Groups = dict[str, list[int]]


def cpu_of(groups: Groups) -> dict[str, float]:
    return {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}


def rss_of(groups: Groups) -> dict[str, int]:
    return {name: sum(rss_bytes(p) for p in pids) for name, pids in groups.items()}


def start_spies(py_spy: str, pids: list[int], out: Path, label: str) -> list[subprocess.Popen[bytes]]:
    """py-spy sampling each of ``pids`` (200 Hz, without pausing it) into ``out/LABEL-gwN.txt``, collapsed stacks."""
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([py_spy, "record", "--nonblocking", "--format", "raw", "--rate", "200", "--pid",
                              str(pid), "--output", str(out / f"{label}-gw{i}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i, pid in enumerate(pids)]


async def stop_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    """Stop py-spy processes (SIGINT: each writes its profile) and wait for them."""
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        while spy.poll() is None:
            await asyncio.sleep(0.05)  # a child's exit, polled: nothing else to wait on here


def per_item_us(before: dict[str, float], after: dict[str, float], items: int) -> dict[str, float]:
    """CPU microseconds per item of each group between two :func:`cpu_of` readings."""
    return {k: round((after[k] - before[k]) / max(items, 1) * 1e6, 1) for k in after}


class EdgeStack(Stack):
    """HAProxy -> ``gateways`` gateways -> ``backends`` ``echo`` backends, and a private Redis."""

    def start(self) -> None:
        self.redis.start()
        self.settings = test_settings(self.redis.url, heartbeat_interval=1.0, ttl=5.0,
                                      resync_interval=3.0, drain_grace=2.0, log_level="WARNING")
        config_file = self.workdir / "edge.toml"
        config_file.write_text(
            "[services.gateway]\n"
            "request_timeout = 10.0\n"
            "drain_grace = 2.0\n"
            "max_connections = 20000\n"
            f'topics = ["{TOPIC.split(".")[0]}.*"]\n'
            'services = ["echo"]\n')
        self.env = {"MESHKIT_CONFIG": str(config_file)}
        self.backends = [self.spawn(ECHO) for _ in range(self.config.backends)]
        self.gateways = [self.spawn(GATEWAY) for _ in range(self.config.gateways)]
        for proc in [*self.backends, *self.gateways]:
            proc.wait_registered(60)
        self.start_haproxy()

    def write_proxy_config(self) -> None:
        """The ``stratum`` frontend with room for the largest fan-out (HAProxy's default is 2,000).

        HAProxy needs two descriptors per proxied connection and refuses to
        start if ``maxconn`` does not fit the open-file limit, so it is derived
        from that limit.
        """
        maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2
        (self.workdir / "haproxy.toml").write_text(
            f"[haproxy]\nmaxconn = {maxconn}\nstop_timeout = 10.0\n"
            f'\n[[frontend]]\nname = "{LISTENER}"\nbind = "127.0.0.1:3333"  # replaced by --bind\n'
            f'service = "gateway"\nlistener = "{LISTENER}"\nmaxconn = {maxconn}\n')

    def gateway_addresses(self) -> list[tuple[str, int]]:
        out = []
        for gw in self.gateways:
            assert gw.record is not None
            host, port = gw.record.listeners[LISTENER].rsplit(":", 1)
            out.append((host, int(port)))
        return out

    def groups(self) -> Groups:
        """The server-side process groups: HAProxy (and its sync process), gateways, backends.

        HAProxy's processes are found by the run directory on their command
        line, not as children of the sync process: a master may be started
        detached, in a session of its own, and its workers are its children.
        """
        assert self.haproxy is not None
        run_dir = os.fsencode(str(self.workdir / "haproxy"))
        proxy = {self.haproxy.pid}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if run_dir in f.read():
                            proxy.add(int(entry))
                except OSError:
                    pass  # gone meanwhile
        return {"haproxy": sorted(proxy), "gateways": [g.pid for g in self.gateways],
                "backends": [b.pid for b in self.backends]}


def default_config() -> ProofConfig:
    return ProofConfig(backends=2, gateways=2)


@dataclass
class Baseline:
    """The one-process server (:mod:`edge_baseline`) in a child process."""

    process: subprocess.Popen[bytes] | None = None
    address: tuple[str, int] = ("", 0)

    def start(self) -> Baseline:
        self.process = subprocess.Popen([sys.executable, str(HERE / "edge_baseline.py")],
                                        stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if ":" not in line:
            self.stop()
            raise RuntimeError(f"the baseline server did not start (said {line[:80]!r})")
        host, port = line.rsplit(":", 1)
        self.address = (host, int(port))
        return self

    def groups(self) -> Groups:
        assert self.process is not None
        return {"server": [self.process.pid]}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class ClientProc:
    """One :mod:`edge_clients` process: ``ready`` -> :meth:`go` -> :meth:`result`."""

    process: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    completed: dict[int, float] = field(default_factory=dict)  # fan-out: seq -> last arrival
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    final: asyncio.Future[dict[str, Any]] | None = None
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(cls, *args: str, env: dict[str, str] | None = None) -> ClientProc:
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "edge_clients.py"), *args, env=full_env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        self = cls(proc)
        self.final = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        assert self.process.stdout is not None and self.final is not None
        while line := await self.process.stdout.readline():
            if line.strip() == b"ready":
                self.ready.set()
                continue
            doc = json.loads(line)
            if "seq" in doc:
                self.completed[int(doc["seq"])] = float(doc["last"])
                self.changed.set()
            elif "result" in doc and not self.final.done():
                self.final.set_result(doc["result"])
        if not self.final.done():
            self.final.set_exception(RuntimeError(f"client exited with {await self.process.wait()}"))
        self.ready.set()  # wake a waiter; wait_ready sees the exit

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.final is not None and self.final.done() and self.final.exception():
            raise RuntimeError("a client process exited before it was ready") from self.final.exception()

    def send(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word.encode() + b"\n")

    async def wait_seq(self, seq: int, deadline: float) -> float | None:
        """The last arrival of push ``seq`` at this process, or None at ``deadline`` (monotonic)."""
        loop = asyncio.get_running_loop()
        while seq not in self.completed:
            self.changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                return None
        return self.completed[seq]

    async def result(self, timeout: float) -> dict[str, Any]:
        """The process's result; it keeps running (for its CPU counters) until :meth:`close`."""
        assert self.final is not None
        try:
            return await asyncio.wait_for(self.final, timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Tell the process to exit and wait for it (kill it if it does not within 10 s)."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
