"""The ZAP handler and the caller's User-Id, over a unix socket in the test's directory (no network).

Not ``inproc://``: libzmq runs no security mechanism there, so CURVE and ZAP would not be exercised.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from meshkit import curve, zap
from meshkit.config import Settings
from meshkit.transport import SocketPump


def _settings(folder: Path, name: str) -> Settings:
    return Settings.load(None, {}, curve="on", key_dir=str(folder), key_name=name)


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], pair: curve.Keypair | None, server: str,
            endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if pair is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = pair.public, pair.secret, server.encode()
    sock.connect(endpoint)
    return sock


async def _until(predicate: object, what: str) -> None:
    for _ in range(400):  # a deadline of about 2 s, checked between loop turns
        if callable(predicate) and predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_trusted_callers_get_their_service_as_user_id_and_the_rest_are_counted(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("vault", "teller"):
        curve.generate(keys, name)
    curve.generate(tmp_path / "other", "stranger")

    async def run() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        refused: list[str] = []
        server: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        door = zap.apply_server(server, _settings(keys, "vault"), ctx, refused.append)
        assert door is not None and door.public_key == curve.load_keypair(_settings(keys, "vault")).public_text
        seen: list[tuple[bytes, str | None]] = []
        pump = SocketPump(server, lambda frames: seen.append((frames[-1], pump.user_id)), user_id=True)
        endpoint = f"ipc://{tmp_path}/vault.sock"
        server.bind(endpoint)
        pump.start()
        teller = curve.load_keypair(_settings(keys, "teller"))
        stranger = curve.load_keypair(_settings(tmp_path / "other", "stranger"))
        good = _dealer(ctx, teller, door.public_key, endpoint)
        bad = _dealer(ctx, stranger, door.public_key, endpoint)
        bare = _dealer(ctx, None, "", endpoint)
        for sock in (good, bad, bare):
            sock.send(b"from " + (b"good" if sock is good else b"other"))
        await _until(lambda: seen and door.refused[zap.UNTRUSTED] and door.refused[zap.HANDSHAKE], "all three")
        assert seen == [(b"from good", "teller")]
        assert door.admitted == 1 and sorted(refused) == [zap.HANDSHAKE, zap.UNTRUSTED]
        for sock in (good, bad, bare):
            sock.close()
        pump.stop()
        door.close()
        assert ctx not in zap._handlers  # the last door out stopped the handler
        # A new server of the same context gets a handler again.
        again: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        door2 = zap.apply_server(again, _settings(keys, "vault"), ctx, refused.append)
        assert door2 is not None and zap._handlers[ctx] is door2.handler
        door2.close()
        again.close(linger=0)
        server.close(linger=0)
        ctx.term()

    asyncio.run(run())


def test_curve_off_changes_nothing(tmp_path: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    try:
        assert zap.apply_server(sock, Settings.load(None, {}), ctx, print) is None
        assert not sock.curve_server
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_server_without_its_keypair_does_not_start(tmp_path: Path) -> None:
    curve.generate(tmp_path, "teller")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(Exception, match="meshkit keys gen vault"):
            zap.apply_server(sock, _settings(tmp_path, "vault"), ctx, print)
    finally:
        sock.close(linger=0)
        ctx.term()
