"""Redis done properly, part one: TLS with client certificates, and an ACL user per namespace.

TLS runs on a namespace host (Redis's TLS port cannot be port 0, and a fixed
port is safe only inside the test's own namespace); the services and probes
that use ``rediss://`` run on the hosts, and the test reads the registry
through the server's plain unix socket. The ACL test needs no network at all:
a private Redis on a unix socket.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import pytest
import redis
from redis.exceptions import NoPermissionError
from rediskit import REDIS_PORT, make_certificates, probe, running, start_redis

from meshkit import Client, curve
from meshkit.record import InstanceRecord
from meshkit.redisconn import sync_client
from meshkit.registration import Registration
from meshkit.testing import (
    MakeHosts,
    RedisServer,
    StartService,
    read_records,
    settings_env,
    test_settings,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_rediss_with_a_ca_and_client_certificates(host_network: MakeHosts, tmp_path: Path) -> None:
    net = host_network(2)
    certs = make_certificates(tmp_path / "tls", net[1].address)
    server = start_redis(net[1], tmp_path / "redis", "--tls-cert-file", str(certs.server_cert),
                         "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca),
                         "--tls-auth-clients", "yes", tls=True)
    base = f"rediss://{net[1].address}:{REDIS_PORT}/0"
    url = f"{base}?ca_file={certs.ca}&cert_file={certs.client_cert}&key_file={certs.client_key}"

    # The right CA and a client certificate: in. Everything else: out, and said so.
    assert probe(net, 2, url) == {"ok": "True"}
    no_client_cert = probe(net, 2, f"{base}?ca_file={certs.ca}")
    # TLS 1.3 reports the server's refusal at the first read or write, worded either way.
    assert no_client_cert.get("error") == "ConnectionError", no_client_cert
    wait_until(lambda: "did not return a certificate" in server.process.tail(50), 5.0,
               "the server to log the refused client")
    wrong_ca = probe(net, 2, f"{base}?ca_file={certs.other_ca}&cert_file={certs.client_cert}"
                             f"&key_file={certs.client_key}")
    assert "certificate verify failed" in wrong_ca.get("message", ""), wrong_ca
    plain = probe(net, 2, f"redis://{net[1].address}:{REDIS_PORT}/0")
    assert "error" in plain, plain

    # A service on host 2 registers over TLS, and a caller on host 2 finds and calls it.
    keys = tmp_path / "keys"  # CurveZMQ is on off loopback (meshkit.curve): a keypair for each role
    for name in ("echo", "client"):
        curve.generate(keys, name)
    settings = test_settings(url, key_dir=str(keys))
    unix = settings.replace(redis_url=server.unix_url)
    env = settings_env(settings) | {"MESHKIT_BIND_HOST": net[2].address, "MESHKIT_ADVERTISE_HOST": net[2].address}
    echo = net[2].run([sys.executable, "-m", "meshkit", "run", "services.echo:Echo"], env=env, label="echo")
    wait_until(lambda: running(echo) and read_records(unix, "echo"), 20.0, "echo to register over TLS")
    caller = net[2].run([sys.executable, "-c", CALL_ONCE], env=settings_env(settings), label="caller")
    assert caller.process.wait(30) == 0, caller.tail()
    assert caller.tail().splitlines()[-1] == "42"


CALL_ONCE = """
from meshkit import Client, Settings
from meshkit.testing import wait_until
with Client(Settings.load()) as client:
    wait_until(lambda: client.instances("echo"), 10.0, "echo")
    print(client.call("echo", "echo", [42]))
"""


def acl_user(admin: redis.Redis, namespace: str, password: str) -> str:
    """A registry user that may touch only ``namespace``'s keys and channels (the rules docs/operations.md gives)."""
    user = f"reg-{namespace}"
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "resetkeys", f"~{namespace}:*",
                          "resetchannels", f"&{namespace}:*", "-@all", "+@read", "+@write", "+@keyspace",
                          "+@pubsub", "+@scripting", "+@transaction", "+@connection", "-@dangerous")
    return user


def test_an_acl_user_runs_the_mesh_in_its_namespace_and_cannot_touch_anything_else(
        start_service: StartService) -> None:
    with RedisServer() as server:
        server.start()
        admin = server.client()
        settings = test_settings(server.url)
        password = "pw-" + uuid.uuid4().hex
        user = acl_user(admin, settings.namespace, password)
        restricted = settings.replace(redis_url=f"unix://{user}:{password}@{server.socket_path}")

        # The whole mesh works with the restricted user: register, discover, call.
        [proc] = start_service("services.echo:Echo", settings=restricted)
        with Client(restricted) as client:
            wait_until(lambda: client.instances("echo"), 10.0, "the echo instance")
            assert client.call("echo", "echo", ["through an ACL user"]) == "through an ACL user"
        assert proc.record is not None
        assert [r.key for r in read_records(restricted, "echo")] == [proc.record.key]

        # ... and it can touch nothing outside its namespace.
        admin.set("other:inst:echo:forged", b"{}")
        mine = sync_client(restricted.redis_url)
        attempts = {
            "read another namespace": lambda: mine.get("other:inst:echo:forged"),
            "write another namespace": lambda: mine.set("other:x", "1"),
            "publish on another channel": lambda: mine.publish("other:changes", "{}"),
            "flush everything": lambda: mine.flushall(),
            "read the configuration": lambda: mine.config_get("*"),
            "list every key": lambda: mine.execute_command("KEYS", "*"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(NoPermissionError):
                attempt()
                pytest.fail(f"the namespace's user could {what}")
        foreign = Registration(settings.replace(redis_url=restricted.redis_url, namespace="other"),
                               InstanceRecord("echo", "forged", "tcp://127.0.0.1:1", "h", 1))
        with pytest.raises(NoPermissionError):
            asyncio.run(_store_once(foreign))
        assert admin.get("other:inst:echo:forged") == b"{}"
        assert admin.exists("other:x") == 0
        mine.close()
        admin.close()
        proc.kill()


async def _store_once(registration: Registration) -> None:
    try:
        await registration._store(registration.record, announce=True)
    finally:
        await registration.abandon()
