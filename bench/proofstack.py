"""The processes of the restart proof (``bench/restarts.py``) and how to start and stop them.

Nothing here picks a port: Redis listens on a unix socket, services and
gateways bind port 0, and the public port is a socket bound on
``127.0.0.1:0`` here and handed to ``meshkit haproxy sync`` as ``fd@N``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadclients import probe_connection

from meshkit.config import Settings
from meshkit.haproxy.process import stop_haproxy
from meshkit.testing import (
    ProcessExitedError,
    RedisServer,
    ServiceProcess,
    settings_env,
    test_settings,
    wait_until,
)

SHARES = "services.shares:ShareLogger"
JOBS = "services.jobs:JobAnnouncer"
GATEWAY = "meshkit.gateway:Gateway"
LISTENER = "stratum"


@dataclass
class ProofConfig:
    """The knobs of one run (the bench's defaults; the test scales them down)."""

    clients: int = 200
    rate: float = 3.0  # requests per second per client
    backends: int = 3
    gateways: int = 2
    request_timeout: float = 5.0
    gateway_grace: float = 5.0
    job_interval: float = 1.0
    gap: float = 6.0  # longer than request_timeout, so the first requests of the gap time out
    settle: float = 2.0  # steady load before, between and after scenarios
    reloads: int = 3
    churn: float = 10.0  # new connections per second during d and e
    scale_up_to: int = 6
    scale_down_to: int = 2


@dataclass
class Stack:
    """Every process of the proof, and how to start and stop each kind."""

    config: ProofConfig
    workdir: Path
    redis: RedisServer = field(default_factory=RedisServer)
    settings: Settings | None = None
    shares: list[ServiceProcess] = field(default_factory=list)
    jobs: ServiceProcess | None = None
    gateways: list[ServiceProcess] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    public: socket.socket | None = None
    env: dict[str, str] = field(default_factory=dict)
    sync_log: Path = Path()
    reloads: int = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self.public is not None
        host, port = self.public.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        cfg = self.config
        self.redis.start()
        self.settings = settings = test_settings(self.redis.url, drain_grace=5.0)
        config_file = self.workdir / "proof.toml"
        config_file.write_text(
            "[services.gateway]\n"
            f"request_timeout = {cfg.request_timeout}\n"
            f"drain_grace = {cfg.gateway_grace}\n"
            'topics = ["jobs.*"]\n'
            'services = ["shares", "jobs"]\n'
            "\n[services.jobs]\n"
            f"job_interval = {cfg.job_interval}\n")
        self.env = {"MESHKIT_CONFIG": str(config_file)}
        self.jobs = self.spawn(JOBS)
        self.shares = [self.spawn(SHARES) for _ in range(cfg.backends)]
        self.gateways = [self.spawn(GATEWAY) for _ in range(cfg.gateways)]
        for proc in [self.jobs, *self.shares, *self.gateways]:
            proc.wait_registered(30)
        client = self.redis.client()
        wait_until(lambda: client.get(f"{settings.namespace}:jobs:current"), 10, "a first job")
        client.close()
        self.start_haproxy()

    def spawn(self, target: str) -> ServiceProcess:
        assert self.settings is not None
        proc = ServiceProcess(target, self.settings, env=self.env, log_dir=str(self.workdir))
        proc.spawn()
        return proc

    def start_many(self, target: str, count: int) -> list[ServiceProcess]:
        procs = [self.spawn(target) for _ in range(count)]
        for proc in procs:
            proc.wait_registered(30)
        return procs

    # -- HAProxy ------------------------------------------------------------------

    def write_proxy_config(self) -> None:
        """Our own ``haproxy.toml``: the ``stratum`` frontend; ``maxconn`` varies per reload."""
        (self.workdir / "haproxy.toml").write_text(
            "[haproxy]\n"
            f"maxconn = {2000 + self.reloads}\n"
            "stop_timeout = 10.0\n"
            "\n[[frontend]]\n"
            f'name = "{LISTENER}"\n'
            'bind = "127.0.0.1:3333"  # replaced by --bind\n'
            'service = "gateway"\n'
            f'listener = "{LISTENER}"\n')

    def start_haproxy(self) -> None:
        assert self.settings is not None
        self.public = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.public.bind(("127.0.0.1", 0))
        self.public.listen(1024)
        fd = self.public.fileno()
        self.write_proxy_config()
        env = dict(os.environ)
        env.update(settings_env(self.settings))
        env.update(self.env)
        self.sync_log = self.workdir / "haproxy-sync.log"
        with open(self.sync_log, "wb") as log:
            self.haproxy = subprocess.Popen(
                [sys.executable, "-m", "meshkit", "haproxy", "sync",
                 "--config", str(self.workdir / "haproxy.toml"),
                 "--bind", f"{LISTENER}=fd@{fd}", "--run-dir", str(self.workdir / "haproxy")],
                env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(fd,))
        host, port = self.address
        wanted = {g.record.instance_id for g in self.gateways if g.record is not None}

        def all_gateways_reachable() -> bool:
            assert self.haproxy is not None
            if self.haproxy.poll() is not None:
                raise ProcessExitedError(f"haproxy sync exited with {self.haproxy.returncode}")
            seen = {asyncio.run(probe_connection(host, port, 1.0)) for _ in range(4 * len(wanted))}
            return wanted <= seen

        wait_until(all_gateways_reachable, 30, "HAProxy to route to every gateway", interval=0.2)

    def reload_haproxy(self) -> None:
        """Change the HAProxy config's structure and SIGHUP the sync process, which reloads
        HAProxy; return once the sync process says the new worker answers."""
        assert self.haproxy is not None
        before = self.sync_log.read_text(errors="replace").count("haproxy reloaded")
        self.reloads += 1
        self.write_proxy_config()
        self.haproxy.send_signal(signal.SIGHUP)
        wait_until(lambda: self.sync_log.read_text(errors="replace").count("haproxy reloaded") > before,
                   15, "the sync process to reload HAProxy", interval=0.05)

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGTERM)
            try:
                self.haproxy.wait(20)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait(5)
        for proc in [*self.gateways, *self.shares, *([self.jobs] if self.jobs else [])]:
            proc.kill()
        # HAProxy outlives its sync process; only stop_haproxy stops it (softly: the gateways are gone).
        stop_haproxy(self.workdir / "haproxy", timeout=5.0)
        if self.public is not None:
            self.public.close()
        self.redis.stop()
