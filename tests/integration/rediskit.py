"""Redis servers, Sentinels and certificates for the tests that run Redis on namespace hosts.

Redis cannot bind port 0 and report it, so servers on namespace hosts use
fixed ports: they are inside the test's own namespaces, which nothing else
uses, so they cannot collide with anything on the machine. The test process
itself reaches every server through its unix socket (a file, not a network
address); only processes started on the hosts use the 198.18.x addresses.

Run as a script (``python rediskit.py probe URL``) it is the probe a test
starts on a host: one PING through :func:`meshkit.redisconn.sync_client`,
and one JSON line saying how it went.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import redis

from meshkit.redisconn import sync_client
from meshkit.testing import HostNetwork, HostProcess, ProcessExitedError, find_program, wait_until
from meshkit.testing.hosts import Host

REDIS_PORT = 6390
SENTINEL_PORT = 26390


@dataclass(frozen=True)
class HostRedis:
    """A redis-server (or Sentinel) on a host: its process, its TCP address there and its unix socket."""

    process: HostProcess
    host: Host
    port: int
    socket: Path

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        """A blocking client on the unix socket (close it: ``with server.client() as c``)."""
        return sync_client(self.unix_url, timeout=2.0)


def running(proc: HostProcess) -> bool:
    """True while ``proc`` runs; once it has exited, ``ProcessExitedError`` with its log, which ends a wait."""
    if not proc.running():
        raise ProcessExitedError(f"{proc.argv[0]} on {proc.host} exited: {proc.tail()}")
    return True


def start_redis(host: Host, directory: Path, *args: str, port: int = REDIS_PORT, tls: bool = False,
                label: str = "redis") -> HostRedis:
    """redis-server on ``host``'s address (TLS only on that port if ``tls``), plus a plain unix socket."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / f"{label}.sock"
    listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    proc = host.run([find_program("redis-server"), "--bind", host.address, *listen, "--protected-mode", "no",
                     "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                     "--dir", str(directory), "--loglevel", "notice", "--repl-diskless-sync-delay", "0",
                     *args], label=label)
    server = HostRedis(proc, host, port, sock)
    wait_until(lambda: running(proc) and _ping(server), 10.0, f"{label} on {host.name}")
    return server


def _ping(server: HostRedis) -> bool:
    with server.client() as client:
        return bool(client.ping())


def start_sentinel(host: Host, directory: Path, master: HostRedis, name: str, quorum: int = 2,
                   down_after_ms: int = 1000) -> HostRedis:
    """A Sentinel on ``host`` watching ``master`` as ``name``; it also listens on a unix socket."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "sentinel.sock"
    conf = directory / "sentinel.conf"
    conf.write_text("\n".join([
        f"bind {host.address}", f"port {SENTINEL_PORT}", "protected-mode no", f"dir {directory}",
        f"unixsocket {sock}", "unixsocketperm 700",
        f"sentinel monitor {name} {master.host.address} {master.port} {quorum}",
        f"sentinel down-after-milliseconds {name} {down_after_ms}",
        f"sentinel failover-timeout {name} 10000",
        f"sentinel parallel-syncs {name} 1",
    ]) + "\n")
    proc = host.run([find_program("redis-server"), str(conf), "--sentinel"], label="sentinel")
    sentinel = HostRedis(proc, host, SENTINEL_PORT, sock)
    wait_until(lambda: running(proc) and _ping(sentinel), 10.0, f"sentinel on {host.name}")
    return sentinel


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for one IP address, a client certificate, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_certificates(directory: Path, server_ip: str) -> Certificates:
    """Generate the :class:`Certificates` with ``openssl`` (keys readable by their owner only)."""
    openssl = find_program("openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    def ca(name: str) -> tuple[Path, Path]:
        key, cert = directory / f"{name}.key", directory / f"{name}.pem"
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=meshkit test {name}")
        return cert, key

    def leaf(name: str, ca_cert: Path, ca_key: Path, ext: str) -> tuple[Path, Path]:
        key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
        extfile = directory / f"{name}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={name}")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extfile))
        return cert, key

    ca_cert, ca_key = ca("ca")
    other_ca, _ = ca("other-ca")
    server_cert, server_key = leaf("server", ca_cert, ca_key,
                                   f"subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth")
    client_cert, client_key = leaf("client", ca_cert, ca_key, "extendedKeyUsage=clientAuth")
    for path in directory.glob("*.key"):
        path.chmod(0o600)
    return Certificates(ca_cert, server_cert, server_key, client_cert, client_key, other_ca)


def probe(net: HostNetwork, index: int, url: str) -> dict[str, str]:
    """PING ``url`` from host ``index`` through meshkit's client; ``{"ok": ...}`` or ``{"error": ...}``."""
    proc = net[index].run([sys.executable, __file__, "probe", url], label="probe")
    code = proc.process.wait(20)
    lines = [line for line in Path(proc.log_path).read_text().splitlines() if line.startswith("{")]
    assert lines, f"probe exited {code} without an answer: {proc.tail()}"
    result: dict[str, str] = json.loads(lines[-1])
    return result


def _probe_main(url: str) -> int:
    from redis.exceptions import RedisError

    from meshkit.redisconn import sync_client

    try:
        client = sync_client(url, timeout=3.0)
        answer = client.ping()
        print(json.dumps({"ok": str(answer)}))
        return 0
    except (RedisError, OSError) as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)[:300]}))
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        sys.exit(_probe_main(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} probe URL")
