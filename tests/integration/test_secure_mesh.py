"""CurveZMQ and access control with real service processes and a real Redis (docs/security.md).

Every test gets a key directory of its own with keypairs for ``vault``,
``teller`` and ``client`` (this test's caller), and a ``stranger`` keypair
kept outside it (a valid CURVE key nobody trusts).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from meshkit import Client, ForbiddenError, Settings, access, curve, wire
from meshkit.record import InstanceRecord
from meshkit.registry import Registry
from meshkit.testing import RedisServer, ServiceProcess, StartService, settings_env, wait_until

pytestmark = pytest.mark.integration

VAULT = "tests.integration.services.vault:Vault"
TELLER = "tests.integration.services.vault:Teller"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    for name in ("vault", "teller", "client"):
        curve.generate(folder, name)
    curve.generate(tmp_path / "elsewhere", "stranger", "vault")
    return folder


@pytest.fixture
def secure(mesh_settings: Settings, keys: Path) -> Settings:
    return mesh_settings.replace(curve="on", key_dir=str(keys))  # a service uses its own key, this test "client"


@pytest.fixture
def client(secure: Settings) -> Iterator[Client]:
    c = Client(secure)
    yield c
    c.close()


def _policy(tmp_path: Path, secure: Settings, text: str) -> Settings:
    path = tmp_path / "access.toml"
    path.write_text(text)
    return secure.replace(access_policy=str(path))


def _keypair(folder: Path, name: str) -> curve.Keypair:
    return curve.load_keypair(Settings.load(None, {}, key_dir=str(folder), key_name=name))


def _raw_call(endpoint: str, pair: curve.Keypair | None, server_key: str, wait: float = 1.5) -> list[bytes] | None:
    """One CALL of vault.read from a bare DEALER (CURVE with ``pair``, or none); the answer or None."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None:
        sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
        sock.curve_serverkey = server_key.encode()
    sock.connect(endpoint)
    try:
        sock.send_multipart(wire.encode_call(7, "vault", "read", ["k"], {}, 5000, None, None))
        if sock.poll(int(wait * 1000)):
            return sock.recv_multipart()
        return None
    finally:
        sock.close()
        ctx.term()


def _log_records(log_path: str, message: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.startswith("{")]
    return [r for r in lines if message in str(r.get("event", ""))]


def test_calls_cross_curve_and_each_record_carries_its_key(start_service: StartService, secure: Settings,
                                                           client: Client, keys: Path) -> None:
    [vault] = start_service(VAULT, settings=secure)
    start_service(TELLER, settings=secure)
    assert vault.record is not None and vault.record.curve_key == _keypair(keys, "vault").public_text
    wait_until(lambda: len(client.instances()) == 2, 5.0, "the client to see both instances")
    assert client.call("teller", "relay", ["read", "k"]) == "value of k"  # client -> teller -> vault
    assert client.call("vault", "read", ["x"]) == "value of x"


def test_a_bare_dealer_without_keys_cannot_call_and_is_counted(start_service: StartService,
                                                              secure: Settings) -> None:
    [vault] = start_service(VAULT, settings=secure)
    assert vault.record is not None
    assert _raw_call(vault.record.endpoint, None, "") is None
    wait_until(lambda: _log_records(vault.log_path, "refused a connection"), 5.0, "the refusal to be logged")
    [line] = _log_records(vault.log_path, "refused a connection")[:1]
    assert "handshake failed" in str(line["event"]) and line["refused"] == 1


def test_a_key_not_trusted_is_refused_and_counted(start_service: StartService, secure: Settings,
                                                  keys: Path) -> None:
    [vault] = start_service(VAULT, settings=secure)
    assert vault.record is not None
    stranger = _keypair(keys.parent / "elsewhere", "stranger")
    assert _raw_call(vault.record.endpoint, stranger, vault.record.curve_key) is None
    wait_until(lambda: _log_records(vault.log_path, "is not trusted"), 5.0, "the refusal to be logged")
    [line] = _log_records(vault.log_path, "is not trusted")[:1]
    assert line["refused"] == 1  # counted: the log line carries the count of refusals for that cause
    # The same DEALER with a trusted key is answered: the refusal was about the key alone.
    answer = _raw_call(vault.record.endpoint, _keypair(keys, "client"), vault.record.curve_key)
    assert answer is not None and wire.decode_header(answer[0]).kind == wire.REPLY


def test_an_impersonating_record_in_redis_is_ignored(start_service: StartService, secure: Settings,
                                                     redis_server: RedisServer, keys: Path) -> None:
    [vault] = start_service(VAULT, settings=secure)
    assert vault.record is not None
    stranger = _keypair(keys.parent / "elsewhere", "stranger").public_text
    teller_key = _keypair(keys, "teller").public_text  # trusted, but for another service
    fakes = {"fake1": stranger, "fake2": teller_key, "fake3": ""}
    for instance, key in fakes.items():
        fake = InstanceRecord("vault", instance, "tcp://127.0.0.1:9", "127.0.0.1", 1, curve_key=key,
                              methods=("read",))
        redis_server.client().set(f"{secure.namespace}:inst:vault:{instance}", fake.to_json(), ex=60)

    async def view() -> tuple[set[str], int]:
        registry = Registry(secure)
        await registry.start()
        try:
            return {r.instance_id for r in registry.instances("vault")}, registry.rejected
        finally:
            await registry.close()

    seen, rejected = asyncio.run(view())
    assert seen == {vault.record.instance_id}
    assert rejected >= 3
    # Without CURVE (a dev setup) the same records would be believed: the filter is what stops them.
    plain, _ = asyncio.run(_plain_view(secure))
    assert set(fakes) <= plain


async def _plain_view(settings: Settings) -> tuple[set[str], int]:
    registry = Registry(settings.replace(curve="off", key_dir=""))
    await registry.start()
    try:
        return {r.instance_id for r in registry.instances("vault")}, registry.rejected
    finally:
        await registry.close()


def test_the_policy_refuses_a_forbidden_call(start_service: StartService, secure: Settings,
                                             tmp_path: Path) -> None:
    settings = _policy(tmp_path, secure, '[default]\ncall = ["*"]\n\n'
                                         '[services.client]\ncall = ["vault.read", "teller.*"]\n')
    [vault] = start_service(VAULT, settings=settings)
    start_service(TELLER, settings=settings)
    with Client(settings) as c:
        wait_until(lambda: len(c.instances()) == 2, 5.0, "the client to see both instances")
        assert c.call("vault", "read", ["k"]) == "value of k"
        with pytest.raises(ForbiddenError, match=r"may not call vault\.wipe"):
            c.call("vault", "wipe")
        assert c.call("teller", "relay", ["wipe"]) == "wiped"  # teller may: the default rule
    wait_until(lambda: _log_records(vault.log_path, "rejected a message: forbidden"), 5.0, "the log line")


def test_the_policy_covers_the_reserved_mesh_methods(start_service: StartService, secure: Settings,
                                                    tmp_path: Path) -> None:
    # _mesh.* methods (introspection, taps, log levels) are answered even while busy or draining,
    # but only to a caller the policy lets call them: "vault.*" covers them, "vault.read" does not.
    settings = _policy(tmp_path, secure, '[default]\ncall = ["*"]\n\n'
                                         '[services.client]\ncall = ["vault.read", "teller.*"]\n')
    [vault] = start_service(VAULT, settings=settings)
    [teller] = start_service(TELLER, settings=settings)
    assert vault.record is not None and teller.record is not None
    with Client(settings) as c:
        wait_until(lambda: len(c.instances()) == 2, 5.0, "the client to see both instances")
        with pytest.raises(ForbiddenError, match=r"may not call vault\._mesh\.info"):
            c.call_instance(vault.record.instance_id, "_mesh.info", timeout=5)
        with pytest.raises(ForbiddenError, match=r"may not call vault\._mesh\.log_level"):
            c.call_instance(vault.record.instance_id, "_mesh.log_level", timeout=5)
        assert c.call("vault", "read", ["k"]) == "value of k"  # the connection itself is fine
        info = c.call_instance(teller.record.instance_id, "_mesh.info", timeout=5)
        assert info["instance"] == teller.record.instance_id


def test_a_token_grants_one_method_until_it_expires(start_service: StartService, secure: Settings,
                                                    tmp_path: Path) -> None:
    settings = _policy(tmp_path, secure, '[default]\ncall = ["*"]\n\n[services.client]\ncall = ["teller.*"]\n')
    start_service(VAULT, settings=settings)
    start_service(TELLER, settings=settings)
    with Client(settings) as c:
        wait_until(lambda: len(c.instances()) == 2, 5.0, "the client to see both instances")
        with pytest.raises(ForbiddenError):
            c.call("vault", "read", ["k"])
        token = c.call("teller", "grant", ["client", "read", 2.0])
        issued = time.time()
        meta = {access.TOKEN_META: token}
        assert c.call("vault", "read", ["k"], meta=meta) == "value of k"
        with pytest.raises(ForbiddenError, match="the token is for"):
            c.call("vault", "wipe", meta=meta)  # one method only
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        with pytest.raises(ForbiddenError, match="signature"):
            c.call("vault", "read", ["k"], meta={access.TOKEN_META: forged})

        def refused() -> bool:
            try:
                c.call("vault", "read", ["k"], meta=meta)
            except ForbiddenError as exc:
                assert "expired" in str(exc)
                return True
            return False

        wait_until(refused, 5.0, "the token to expire")
        assert time.time() - issued >= 1.0  # it was honoured until (about) its expiry, not refused early


def test_meshkit_ls_and_call_speak_curve(start_service: StartService, secure: Settings) -> None:
    [vault] = start_service(VAULT, settings=secure)
    env = {**os.environ, **settings_env(secure)}
    listed = subprocess.run([sys.executable, "-m", "meshkit", "ls", "--json", "vault"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert vault.record is not None and row["instance_id"] == vault.record.instance_id
    assert row["state"] == "up", row  # probed over CURVE: reachable
    called = subprocess.run([sys.executable, "-m", "meshkit", "call", "vault", "read", '"k"'], env=env,
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0 and json.loads(called.stdout) == "value of k", called.stderr


@pytest.mark.parametrize("setup", ["open_secret", "no_key_dir"])
def test_a_service_without_a_usable_keypair_does_not_start(secure: Settings, keys: Path, tmp_path: Path,
                                                           setup: str) -> None:
    if setup == "open_secret":
        (keys / "vault.key_secret").chmod(0o644)
        settings, expected = secure, "chmod 0600"
    else:  # bound beyond loopback, hence CURVE on, with no keys configured
        settings, expected = secure.replace(curve="auto", key_dir="", bind_host="0.0.0.0"), "meshkit keys gen"
    proc = ServiceProcess(VAULT, settings, log_dir=str(tmp_path))
    proc.spawn()
    try:
        assert proc.process is not None
        assert proc.process.wait(30) == 1
        assert expected in proc.tail() and "Traceback" not in proc.tail()
    finally:
        proc.kill()
