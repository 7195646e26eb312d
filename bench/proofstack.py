"""The processes of the restart proof (``bench/restarts.py``) and how to start and stop them.

Nothing here picks a port: Redis listens on a unix socket, services and
gateways bind port 0, and the public port is a socket bound on
``127.0.0.1:0`` here and handed to ``meshkit haproxy sync`` as ``fd@N``.

The backends are the demo Stratum pool's (``docs/stratum.md``): ``mining``
instances (:data:`MINING`, any of which judges any connection's shares) and
the ``jobs`` announcer (:data:`JOBS`); the gateways speak the ``stratum``
dialect and move their clients with ``client.reconnect``. The difficulty is
pinned low (:data:`DIFFICULTY`, vardiff's minimum and maximum) so that the
load clients find real shares with a few dozen hashes each, and no block is
found during a run (``block_interval`` far longer than the run): a share
racing a new block is rightly answered stale, which is the protocol at
work, not a request lost by the infrastructure this proof is about.

For ``f_meshkit_restart`` the ``mining`` backends also run under a circusd of
their own (:class:`CircusMining`, control sockets in ``<workdir>/circus``), so
that ``meshkit restart mining`` is measured exactly as an operator runs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadclients import probe_connection

from meshkit import curve
from meshkit.config import Settings
from meshkit.haproxy.process import stop_haproxy
from meshkit.stack.control import CircusControl, StackError
from meshkit.stack.processes import STACK_MARKER, stack_processes, terminate
from meshkit.testing import (
    ProcessExitedError,
    RedisServer,
    ServiceProcess,
    read_records,
    settings_env,
    test_settings,
    wait_until,
)

MINING = "services.mining:Mining"
JOBS = "services.pooljobs:PoolJobs"
BACKEND = "mining"  # the service the clients call, scaled and restarted by the scenarios
DIFFICULTY = 2.0**-28  # about one hash in 16 is a share: real searching, little CPU
GATEWAY = "meshkit.gateway:Gateway"
LISTENER = "stratum"
ROOT = Path(__file__).resolve().parents[1]

CIRCUS_INI = """\
[circus]
endpoint = ipc://{run}/circus.sock
pubsub_endpoint = ipc://{run}/circus-pubsub.sock
multicast_endpoint =
check_delay = 0.5
pidfile = {run}/circusd.pid
logoutput = {run}/circusd.log

[watcher:mining]
cmd = {python} -m meshkit run {target}
working_dir = {root}
numprocesses = {count}
copy_env = True
stop_signal = TERM
graceful_timeout = 15
stderr_stream.class = FileStream
stderr_stream.filename = {run}/mining.log
"""


@dataclass
class CircusMining:
    """``mining`` backends under a circusd of their own, controlled like a real stack's."""

    run_dir: Path
    env: dict[str, str]
    count: int
    circusd: subprocess.Popen[bytes] | None = None

    @property
    def control(self) -> CircusControl:
        return CircusControl(f"ipc://{self.run_dir}/circus.sock", str(self.run_dir / "control.lock"))

    def start(self, settings: Settings) -> None:
        """Start circusd and return once its ``count`` processes are registered ``up``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ini = self.run_dir / "circus.ini"
        ini.write_text(CIRCUS_INI.format(run=self.run_dir, python=sys.executable, target=MINING,
                                         root=ROOT, count=self.count))
        env = {**self.env, "MESHKIT_RUN_DIR": str(self.run_dir), STACK_MARKER: str(self.run_dir)}
        with open(self.run_dir / "circusd.out", "wb") as out:
            self.circusd = subprocess.Popen([sys.executable, "-m", "meshkit.stack.circusd", str(ini)],
                                            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        control = self.control

        def registered() -> bool:
            assert self.circusd is not None
            if self.circusd.poll() is not None:
                raise ProcessExitedError(f"circusd exited with {self.circusd.returncode}")
            if not control.reachable():
                return False
            pids = set(control.pids(BACKEND))
            up = {r.pid for r in read_records(settings, BACKEND) if r.is_up}
            return len(pids) == self.count and pids <= up

        wait_until(registered, 30, "the Circus-run mining backends to register", interval=0.1)

    def stop(self) -> None:
        if self.circusd is None:
            return
        try:
            self.control.quit(deadline=time.monotonic() + 30)
            self.circusd.wait(30)
        except (StackError, subprocess.TimeoutExpired):
            pass
        terminate(stack_processes(str(self.run_dir), self.circusd.pid), grace=5)
        if self.circusd.poll() is None:
            self.circusd.kill()
        self.circusd.wait(10)


@dataclass
class ProofConfig:
    """The knobs of one run (the bench's defaults; the test scales them down)."""

    clients: int = 200
    rate: float = 3.0  # requests per second per client
    backends: int = 3
    gateways: int = 2
    request_timeout: float = 5.0
    gateway_grace: float = 12.0  # > reconnect_window + 1 s: the waves fit in the drain
    job_interval: float = 1.0
    gap: float = 6.0  # longer than request_timeout, so the first requests of the gap time out
    settle: float = 2.0  # steady load before, between and after scenarios
    reloads: int = 3
    churn: float = 10.0  # new connections per second during d and e
    scale_up_to: int = 6
    scale_down_to: int = 2
    # g_gateway_rolling: this many more clients join for it (2,000 in all by default), sending
    # rolling_rate requests per second each; stopping gateways tell at most reconnect_rate
    # clients a second to move, in waves over reconnect_window (within gateway_grace).
    rolling_clients: int = 1800
    rolling_rate: float = 0.2
    reconnect_window: float = 8.0
    reconnect_rate: float = 200.0
    curve: int = 0  # 1: CurveZMQ on every mesh connection (keys in the workdir; docs/security.md)


@dataclass
class Stack:
    """Every process of the proof, and how to start and stop each kind."""

    config: ProofConfig
    workdir: Path
    redis: RedisServer = field(default_factory=RedisServer)
    settings: Settings | None = None
    backends: list[ServiceProcess] = field(default_factory=list)
    jobs: ServiceProcess | None = None
    gateways: list[ServiceProcess] = field(default_factory=list)
    haproxy: subprocess.Popen[bytes] | None = None
    public: socket.socket | None = None
    env: dict[str, str] = field(default_factory=dict)
    sync_log: Path = Path()
    reloads: int = 0
    circus: CircusMining | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.public is not None
        host, port = self.public.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        cfg = self.config
        self.redis.start()
        secure: dict[str, str] = {}
        if cfg.curve:
            keys = self.workdir / "keys"
            for name in ("mining", "jobs", "gateway", "client"):
                curve.generate(keys, name)
            secure = {"curve": "on", "key_dir": str(keys)}
        self.settings = settings = test_settings(self.redis.url, drain_grace=5.0, **secure)
        config_file = self.workdir / "proof.toml"
        config_file.write_text(
            "[services.gateway]\n"
            f"request_timeout = {cfg.request_timeout}\n"
            f"drain_grace = {cfg.gateway_grace}\n"
            f"reconnect_window = {cfg.reconnect_window}\n"
            f"reconnect_rate = {cfg.reconnect_rate}\n"
            # Every miner comes from 127.0.0.1 (through HAProxy's PROXY header): no per-address limits.
            'limit_exempt = ["127.0.0.0/8"]\n'
            'dialect = "stratum"\n'
            'reconnect_method = "client.reconnect"\n'
            'topics = ["mining.notify"]\n'
            'services = ["mining"]\n'
            "\n[services.mining]\n"
            f"min_difficulty = {DIFFICULTY!r}\nmax_difficulty = {DIFFICULTY!r}\n"
            f"start_difficulty = {DIFFICULTY!r}\n"
            "\n[services.jobs]\n"
            f"job_interval = {cfg.job_interval}\n"
            "block_interval = 1000000.0\n")
        self.env = {"MESHKIT_CONFIG": str(config_file)}
        self.jobs = self.spawn(JOBS)
        self.jobs.wait_registered(30)  # first: a mining instance loads its jobs before it registers
        self.backends = [self.spawn(MINING) for _ in range(cfg.backends)]
        self.gateways = [self.spawn(GATEWAY) for _ in range(cfg.gateways)]
        for proc in [*self.backends, *self.gateways]:
            proc.wait_registered(30)
        client = self.redis.client()
        wait_until(lambda: client.llen(f"{settings.namespace}:stratum:jobs"), 10, "a first job")
        client.close()
        self.start_haproxy()

    def spawn(self, target: str) -> ServiceProcess:
        assert self.settings is not None
        proc = ServiceProcess(target, self.settings, env=self.env, log_dir=str(self.workdir))
        proc.spawn()
        return proc

    def child_env(self) -> dict[str, str]:
        """The environment of a child that shares this stack's settings."""
        assert self.settings is not None
        return {**os.environ, **settings_env(self.settings), **self.env}

    def start_circus_mining(self, count: int) -> CircusMining:
        """``count`` mining backends under circusd (see :class:`CircusMining`); return once registered."""
        assert self.settings is not None
        self.circus = CircusMining(self.workdir / "circus", self.child_env(), count)
        self.circus.start(self.settings)
        return self.circus

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
            f"maxconn = {self.config.clients + self.config.rolling_clients + 2000 + self.reloads}\n"
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

    def wait_routed(self, gateway: ServiceProcess, timeout: float = 30.0) -> None:
        """Return once HAProxy sends new connections to ``gateway`` (its health check passed)."""
        assert gateway.record is not None
        host, port = self.address
        wanted = gateway.record.instance_id

        def routed() -> bool:
            return any(asyncio.run(probe_connection(host, port, 1.0)) == wanted for _ in range(6))

        wait_until(routed, timeout, f"HAProxy to route to gateway {wanted}", interval=0.1)

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
        if self.circus is not None:
            self.circus.stop()
        for proc in [*self.gateways, *self.backends, *([self.jobs] if self.jobs else [])]:
            proc.kill()
        # HAProxy outlives its sync process; only stop_haproxy stops it (softly: the gateways are gone).
        stop_haproxy(self.workdir / "haproxy", timeout=5.0)
        if self.public is not None:
            self.public.close()
        self.redis.stop()
