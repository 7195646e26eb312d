"""The processes of ``bench/edge_scale.py``: two HAProxy processes on one port, and probes.

:class:`ScaleStack` is :class:`edge_stack.EdgeStack` (private Redis, ``echo``
backends, gateways) with ``proxies`` ``meshkit haproxy sync`` processes, each
with its own HAProxy and run directory, listening on sockets bound to one
port with ``SO_REUSEPORT`` (:func:`reuseport_sockets`); the kernel spreads new
connections across them. Also the probes the scale run samples with: a fresh
connection's ``mesh.ping`` time (:func:`ping_time`), the kernel's TCP socket
counters (:func:`sockstat_tcp`) and open descriptors (:func:`fd_counts`).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edge_stack import EdgeStack, Groups
from proofstack import LISTENER

from meshkit.haproxy.process import stop_haproxy
from meshkit.testing import ProcessExitedError, settings_env, wait_until

PING = b'{"jsonrpc":"2.0","method":"mesh.ping","id":1}\n'


def reuseport_sockets(count: int) -> list[socket.socket]:
    """``count`` listening sockets on one kernel-chosen port of 127.0.0.1, all ``SO_REUSEPORT``."""
    socks: list[socket.socket] = []
    port = 0
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        sock.listen(4096)
        socks.append(sock)
    return socks


class ScaleStack(EdgeStack):
    """:class:`EdgeStack` with ``proxies`` HAProxy processes sharing the public port (see the module doc)."""

    proxies = 2
    check_timeout = ""  # HAProxy's check timeout ("1s"); empty: the shipped default (300 ms)
    check_fall = 0  # failed checks before a server is DOWN; 0: the shipped default (2)

    def start_haproxy(self) -> None:
        assert self.settings is not None
        self.listeners = reuseport_sockets(self.proxies)
        self.public = self.listeners[0]
        self.syncs: list[subprocess.Popen[bytes]] = []
        env = {**os.environ, **settings_env(self.settings), **self.env}
        for i, sock in enumerate(self.listeners):
            config = self.workdir / f"haproxy-{i}.toml"
            self.write_proxy_config_to(config)
            fd = sock.fileno()
            with open(self.workdir / f"haproxy-sync-{i}.log", "wb") as log:
                self.syncs.append(subprocess.Popen(
                    [sys.executable, "-m", "meshkit", "haproxy", "sync", "--config", str(config),
                     "--bind", f"{LISTENER}=fd@{fd}", "--run-dir", str(self.workdir / f"haproxy-{i}")],
                    env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(fd,)))
        self.haproxy = self.syncs[0]
        for i in range(self.proxies):
            wait_until(lambda i=i: self._proxy_up(i), 30, f"HAProxy {i} to start", interval=0.2)
        host, port = self.address
        wanted = {g.record.instance_id for g in self.gateways if g.record is not None}
        seen: set[str | None] = set()

        def every_gateway_reachable() -> bool:
            for sync in self.syncs:
                if sync.poll() is not None:
                    raise ProcessExitedError(f"haproxy sync exited with {sync.returncode}")
            seen.update(asyncio.run(_probe_many(host, port, 8 * len(wanted))))
            return wanted <= seen

        wait_until(every_gateway_reachable, 30, "HAProxy to route to every gateway", interval=0.2)

    def _proxy_up(self, i: int) -> bool:
        if self.syncs[i].poll() is not None:
            raise ProcessExitedError(f"haproxy sync {i} exited with {self.syncs[i].returncode}")
        return (self.workdir / f"haproxy-{i}" / "haproxy.pid").exists()

    def write_proxy_config_to(self, path: Path) -> None:
        """One HAProxy's config: its share of the descriptors (two per connection) as ``maxconn``."""
        maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 200) // 2
        checks = ""
        if self.check_timeout:
            checks += f'\n[haproxy.timeouts]\ncheck = "{self.check_timeout}"\n'
        if self.check_fall:
            checks += f"\n[haproxy.check]\nfall = {self.check_fall}\n"
        path.write_text(
            f"[haproxy]\nmaxconn = {maxconn}\nstop_timeout = 10.0\n{checks}"
            f'\n[[frontend]]\nname = "{LISTENER}"\nbind = "127.0.0.1:3333"  # replaced by --bind\n'
            f'service = "gateway"\nlistener = "{LISTENER}"\nmaxconn = {maxconn}\n')

    def proxy_pids(self) -> list[int]:
        """Every sync process and every HAProxy process (found by run directory on its command line)."""
        run_dirs = [os.fsencode(str(self.workdir / f"haproxy-{i}")) for i in range(self.proxies)]
        pids = {s.pid for s in self.syncs}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        line = f.read()
                except OSError:
                    continue
                if any(d + b"/" in line or line.endswith(d) for d in run_dirs):
                    pids.add(int(entry))
        return sorted(pids)

    def groups(self) -> Groups:
        assert self.redis.process is not None
        return {"haproxy": self.proxy_pids(), "gateways": [g.pid for g in self.gateways],
                "backends": [b.pid for b in self.backends], "redis": [self.redis.process.pid]}

    def check_downs(self) -> list[str]:
        """HAProxy's own lines (its stderr, ``haproxy.log`` in its run directory) saying a server
        went DOWN or the backend had none left, with the server's sessions at that moment."""
        out = []
        for i in range(self.proxies):
            path = self.workdir / f"haproxy-{i}" / "haproxy.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            for line in text.splitlines():
                if "is DOWN" in line or "no server available" in line:
                    found = re.search(r"(Server \S+ is DOWN).*?(check duration: \d+ms).*?(\d+ sessions active)",
                                      line)
                    out.append(f"haproxy {i}: " + ("; ".join(found.groups()) if found else line[-120:]))
        return out

    def stop(self) -> None:
        for sync in getattr(self, "syncs", []):
            if sync.poll() is None:
                sync.send_signal(signal.SIGTERM)
        for sync in getattr(self, "syncs", []):
            try:
                sync.wait(20)
            except subprocess.TimeoutExpired:
                sync.kill()
                sync.wait(5)
        self.haproxy = None
        for gw in [*self.gateways, *self.backends]:
            gw.kill()
        for i in range(self.proxies):
            stop_haproxy(self.workdir / f"haproxy-{i}", timeout=5.0)
        for sock in getattr(self, "listeners", []):
            sock.close()
        self.public = None
        self.redis.stop()


async def _probe_many(host: str, port: int, count: int) -> list[str | None]:
    from loadclients import probe_connection

    return [await probe_connection(host, port, 1.0) for _ in range(count)]


async def ping_time(host: str, port: int, timeout: float = 5.0) -> float | None:
    """Seconds for a fresh connection to get ``mesh.ping`` answered, or None if it failed."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(PING)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return time.monotonic() - t0 if b'"result"' in line else None
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()


def sockstat_tcp() -> dict[str, int]:
    """``/proc/net/sockstat``'s TCP line: ``inuse``, ``orphan``, ``tw``, ``alloc``, ``mem`` (pages)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                return {parts[i]: int(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    return {}


def fd_counts(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out.append(len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass
    return out
